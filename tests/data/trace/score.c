/* A static glibc program for `emu trace`: score() takes a struct pointer and an int, the
 * global `total` accumulates, and the exit code is total & 0x7f (13 with no arguments). */
#include <stdio.h>
#include <string.h>

struct item {
	const char *name;
	int weight;
	unsigned short flags;
};

static struct item items[] = { { "alpha", 3, 0x1 }, { "beta", -7, 0x12 }, { "gamma", 42, 0x300 } };
long total;

__attribute__((noinline)) long score(const struct item *it, int bonus)
{
	long s = (long)it->weight * 10 + bonus + (long)strlen(it->name);

	total += s;
	return s;
}

int main(int argc, char **argv)
{
	(void)argv;
	for (int i = 0; i < 3; i++)
		printf("%s %ld\n", items[i].name, score(&items[i], argc));
	return (int)(total & 0x7f);
}
