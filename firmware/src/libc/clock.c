/* clock.c - clock_gettime and gettimeofday, each read twice around a busy
 * loop; prints only whether time advanced / is plausible (no raw values). */
#include <stdio.h>
#include <time.h>
#include <sys/time.h>

static volatile unsigned long sink;

static void busy(void)
{
	unsigned long i, x = 1;

	for (i = 0; i < 3000000; i++)
		x = x * 2862933555777941757UL + 3037000493UL;
	sink = x;
}

static long long ts_ns(const struct timespec *t)
{
	return (long long)t->tv_sec * 1000000000LL + t->tv_nsec;
}

static const char *yesno(int b)
{
	return b ? "yes" : "no";
}

int main(void)
{
	struct timespec m0, m1, r0, r1;
	struct timeval g0, g1;
	int rc = 0;

	rc |= clock_gettime(CLOCK_MONOTONIC, &m0);
	rc |= clock_gettime(CLOCK_REALTIME, &r0);
	rc |= gettimeofday(&g0, NULL);
	busy();
	rc |= clock_gettime(CLOCK_MONOTONIC, &m1);
	rc |= clock_gettime(CLOCK_REALTIME, &r1);
	rc |= gettimeofday(&g1, NULL);

	printf("calls succeeded: %s\n", yesno(rc == 0));
	printf("clock_gettime(CLOCK_MONOTONIC) advanced: %s\n", yesno(ts_ns(&m1) > ts_ns(&m0)));
	printf("clock_gettime(CLOCK_REALTIME) advanced: %s\n", yesno(ts_ns(&r1) > ts_ns(&r0)));
	printf("gettimeofday advanced: %s\n",
	       yesno(g1.tv_sec * 1000000LL + g1.tv_usec > g0.tv_sec * 1000000LL + g0.tv_usec));
	printf("nsec fields in range: %s\n",
	       yesno(m0.tv_nsec >= 0 && m0.tv_nsec < 1000000000 && r1.tv_nsec >= 0 &&
		  r1.tv_nsec < 1000000000 && g1.tv_usec >= 0 && g1.tv_usec < 1000000));
	printf("realtime after 2020: %s\n", yesno(r0.tv_sec > 1577836800 && g0.tv_sec > 1577836800));
	printf("realtime ~ gettimeofday: %s\n",
	       yesno(g0.tv_sec - r0.tv_sec <= 2 && r0.tv_sec - g0.tv_sec <= 2));
	return 0;
}
