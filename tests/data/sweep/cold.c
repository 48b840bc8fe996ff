/* cold.c - a function with a path the run never takes, one never called, and work before
 * and between calls (what a sweep from snapshots skips). Prints a checksum. */
#include <stdio.h>
#include <stdlib.h>

static volatile int sink;

__attribute__((noinline)) int work(int x)
{
	if (x > 1000) {                         /* cold: never taken */
		sink = x * 3;
		printf("cold %d\n", x);
		return x * 5 + sink;
	}
	return x + 1;
}

__attribute__((noinline)) int never(int x)
{
	return x * 7 + 1;
}

int main(int argc, char **argv)
{
	int s = 0;
	char *buf = malloc(4096);

	for (int i = 0; i < 20000; i++)         /* a prefix the snapshot skips */
		buf[i & 4095] = (char)(buf[(i * 7) & 4095] + i);
	for (int i = 0; i < 5; i++)
		s += work(i + buf[i & 15]);
	if (argc > 5)
		s += never(argc);
	printf("sum %d\n", s);
	return 0;
}
