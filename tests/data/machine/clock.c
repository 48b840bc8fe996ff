/* Everything time-related a guest can read: clock_gettime on several clocks, gettimeofday,
 * time(), and the raw counter (rdtsc / cntvct_el0). Under emu two runs print the same. */
#include <stdio.h>
#include <sys/time.h>
#include <time.h>

static unsigned long long counter(void)
{
#if defined(__x86_64__)
    unsigned int lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((unsigned long long)hi << 32) | lo;
#else
    unsigned long long v;
    __asm__ volatile("isb; mrs %0, cntvct_el0" : "=r"(v));
    return v;
#endif
}

int main(void)
{
    struct timespec rt, mono, mono2;
    struct timeval tv;
    unsigned long long c1 = counter();
    clock_gettime(CLOCK_REALTIME, &rt);
    clock_gettime(CLOCK_MONOTONIC, &mono);
    gettimeofday(&tv, NULL);
    volatile unsigned long spin = 0;
    for (int i = 0; i < 100000; i++) spin += i;
    clock_gettime(CLOCK_MONOTONIC, &mono2);
    unsigned long long c2 = counter();
    printf("realtime %lld.%09ld\n", (long long)rt.tv_sec, rt.tv_nsec);
    printf("monotonic %lld.%09ld -> %lld.%09ld\n", (long long)mono.tv_sec, mono.tv_nsec,
           (long long)mono2.tv_sec, mono2.tv_nsec);
    printf("gettimeofday %lld.%06ld time %lld\n", (long long)tv.tv_sec, (long)tv.tv_usec,
           (long long)time(NULL));
    printf("counter %llu -> %llu (%s)\n", c1, c2, c2 > c1 ? "increasing" : "NOT increasing");
    return 0;
}
