/* Guest time moves with guest work: CLOCK_MONOTONIC around loops of n and 2n iterations,
 * then a sleep far past the clock's range (it saturates: monotonic never goes back). */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static long long now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static volatile unsigned long sink;

static long long work(unsigned long n)
{
	long long t0 = now_ns();
	for (unsigned long i = 0; i < n; i++)
		sink += i * 7;
	return now_ns() - t0;
}

int main(int argc, char **argv)
{
	unsigned long n = argc > 1 ? strtoul(argv[1], 0, 0) : 100000;
	printf("work n: %lld\n", work(n));
	printf("work 2n: %lld\n", work(2 * n));
	if (argc > 2) {
		long long before = now_ns();
		struct timespec huge = {0x7fffffffffffffffLL, 999999999};
		nanosleep(&huge, 0);
		long long after = now_ns();
		nanosleep(&huge, 0);
		long long later = now_ns();
		printf("after sleep: forward=%d still=%d\n", after > before, later >= after);
	}
	return 0;
}
