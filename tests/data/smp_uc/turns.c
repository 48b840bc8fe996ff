/* Two threads (main and one more, on CPUs 0 and 1 with --cpus 2) each call tick() N times;
 * the probed function of the turn tests. Usage: turns [N] */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>

static long n = 20000;

__attribute__((noinline)) long tick(long x)
{
	__asm__ volatile("" ::: "memory");
	return x * 3 + 1;
}

static void *spin(void *arg)
{
	long acc = 0;
	for (long i = 0; i < n; i++)
		acc += tick(i) & 7;
	*(long *)arg = acc;
	return NULL;
}

int main(int argc, char **argv)
{
	long a = 0, b = 0;
	pthread_t t;

	if (argc > 1)
		n = atol(argv[1]);
	pthread_create(&t, NULL, spin, &a);
	spin(&b);
	pthread_join(t, NULL);
	printf("a=%ld b=%ld\n", a, b);
	return 0;
}
