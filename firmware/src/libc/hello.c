/* hello.c - static glibc "hello": printf of its arguments and a few
 * environment-independent computations.  Exit code 3.
 * argv[0] is printed as its basename only, so the output does not depend on
 * the directory the binary is run from. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static unsigned count_primes(unsigned limit)
{
	unsigned n, d, count = 0;

	for (n = 2; n < limit; n++) {
		for (d = 2; d * d <= n; d++)
			if (n % d == 0)
				break;
		if (d * d > n)
			count++;
	}
	return count;
}

int main(int argc, char **argv)
{
	const char *base = strrchr(argv[0], '/');
	unsigned long long sumsq = 0, fact = 1;
	char buf[64];
	int i;

	printf("hello, world from %s\n", base ? base + 1 : argv[0]);
	printf("argc = %d\n", argc);
	for (i = 1; i < argc; i++)
		printf("argv[%d] = \"%s\" (len %zu)\n", i, argv[i], strlen(argv[i]));
	for (i = 1; i <= 100; i++)
		sumsq += (unsigned long long)i * i;
	for (i = 1; i <= 20; i++)
		fact *= i;
	printf("sum of squares 1..100 = %llu\n", sumsq);
	printf("20! = %llu\n", fact);
	printf("primes below 1000 = %u\n", count_primes(1000));
	printf("355/113 = %.6f, sqrt-free e ~ %.5f\n", 355.0 / 113.0, 2.0 + 0.5 + 1.0 / 6 + 1.0 / 24 + 1.0 / 120 + 1.0 / 720);
	printf("strtol(\"0x7fff\") = %ld, strtoul(\"777\", 8) = %lu\n", strtol("0x7fff", NULL, 0),
	       strtoul("777", NULL, 8));
	snprintf(buf, sizeof(buf), "%-8s|%8s|%+05d|%x|%o|%c", "left", "right", 42, 0xbeef, 8, 'Z');
	printf("format: %s\n", buf);
	printf("sizeof(long) = %zu, sizeof(void *) = %zu\n", sizeof(long), sizeof(void *));
	puts("goodbye (exit code 3)");
	return 3;
}
