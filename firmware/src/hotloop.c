/*
 * hotloop.c - benchmark kernels.
 *   hot_loop(n)  tight xorshift64 checksum loop, ~7 ALU insns/iteration, no
 *                memory traffic (MIPS benchmarks)
 *   hot_call(n)  calls the small noinline hot_leaf(x) n times (probe-hit
 *                benchmarks: put a kprobe/kretprobe on hot_leaf)
 * Usage: hotloop [N [M]]   N = loop iterations (default 1000000),
 *                          M = hot_leaf calls (default N / 10).
 * Bare metal has no arguments and uses the defaults, so its output equals
 * the Linux output without arguments.
 */
#include "platform.h"

#define HOT_DEFAULT_N 1000000

noinline u64 hot_leaf(u64 x)
{
	return (x * 0x9e3779b97f4a7c15ULL) ^ (x >> 7);
}

noinline u64 hot_loop(u64 n)
{
	u64 x = 88172645463325252ULL, s = 0, i;

	for (i = 0; i < n; i++) {
		x ^= x << 13;
		x ^= x >> 7;
		x ^= x << 17;
		s += x ^ i;
	}
	return s;
}

noinline u64 hot_call(u64 n)
{
	u64 s = 0, i;

	for (i = 0; i < n; i++)
		s += hot_leaf(i);
	return s;
}

int hotloop_run(u64 n, u64 m)
{
	putstr("hot_loop(");
	putu64(n);
	putstr(") = ");
	puthex(hot_loop(n));
	putnl();
	putstr("hot_call(");
	putu64(m);
	putstr(") = ");
	puthex(hot_call(m));
	putnl();
	return 0;
}

#ifndef IN_DEMO
int main(int argc, char **argv)
{
	u64 n = HOT_DEFAULT_N, m;

	if (argc > 1)
		n = parse_u64(argv[1], HOT_DEFAULT_N);
	m = n / 10;
	if (argc > 2)
		m = parse_u64(argv[2], m);
	return hotloop_run(n, m);
}
#endif
