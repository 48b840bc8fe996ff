/*
 * counters.c - reads the cycle/time counters around a loop.
 *   x86-64: rdtsc, rdtscp (TSC_AUX is read but not printed)
 *   arm64:  mrs cntvct_el0, mrs cntfrq_el0 (isb before each read)
 * The values depend on the host/emulator: no expected output is recorded,
 * the program only has to run and exit 0.
 */
#include "platform.h"

#if defined(__x86_64__)
noinline u64 read_cycles(void)
{
	u32 lo, hi;

	asm volatile("rdtsc" : "=a"(lo), "=d"(hi));
	return (u64)hi << 32 | lo;
}

noinline u64 read_cycles_p(u32 *aux)
{
	u32 lo, hi, c;

	asm volatile("rdtscp" : "=a"(lo), "=d"(hi), "=c"(c));
	*aux = c;
	return (u64)hi << 32 | lo;
}

static u64 counter_freq(void)
{
	return 0; /* not architecturally discoverable without CPUID leaf 0x15 */
}
#elif defined(__aarch64__)
noinline u64 read_cycles(void)
{
	u64 v;

	asm volatile("isb; mrs %0, cntvct_el0" : "=r"(v) : : "memory");
	return v;
}

noinline u64 read_cycles_p(u32 *aux)
{
	*aux = 0;
	return read_cycles();
}

static u64 counter_freq(void)
{
	u64 f;

	asm volatile("mrs %0, cntfrq_el0" : "=r"(f));
	return f;
}
#endif

noinline u64 spin(u64 n)
{
	u64 x = 1, i;

	for (i = 0; i < n; i++)
		x = x * 6364136223846793005ULL + 1442695040888963407ULL;
	return x;
}

int main(int argc, char **argv)
{
	u64 t0, t1, t2, t3, x;
	u32 aux0, aux1;

	(void)argc;
	(void)argv;
	t0 = read_cycles();
	t1 = read_cycles_p(&aux0);
	x = spin(100000);
	t2 = read_cycles();
	t3 = read_cycles_p(&aux1);
	putstr("counters: freq=");
	putu64(counter_freq());
	putkv("delta", t2 - t0);
	putkv("delta_p", t3 - t1);
	putstr(t2 >= t0 && t3 >= t1 ? " monotonic=yes" : " monotonic=no");
	putkx("spin", x);
	putnl();
	return 0;
}
