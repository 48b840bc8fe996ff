/*
 * recurse.c - recursive functions for return-probe (kretprobe) tests.
 * Every function is noinline/noipa and the tree is built with
 * -fno-optimize-sibling-calls, so each recursion level is a real call with
 * its own return address (no tail calls, no recursion turned into loops).
 * Each function counts its calls so kretprobe hit counts can be checked:
 *   fib(n)            calls = 2*fib(n+1) - 1
 *   factorial(n)      calls = max(n, 1)
 *   is_even/is_odd    mutual recursion, n+1 calls in total
 *   sum_rec(n)        depth n+1 (exercises kretprobe maxactive)
 *   ackermann(m, n)   deep, irregular recursion
 */
#include "platform.h"

static u64 fib_calls, fact_calls, parity_calls, sum_calls, ack_calls;

noinline u64 fib(u32 n)
{
	fib_calls++;
	if (n < 2)
		return n;
	return fib(n - 1) + fib(n - 2);
}

noinline u64 factorial(u32 n)
{
	fact_calls++;
	if (n <= 1)
		return 1;
	return n * factorial(n - 1);
}

noinline int is_odd(u32 n);

noinline int is_even(u32 n)
{
	parity_calls++;
	if (n == 0)
		return 1;
	return is_odd(n - 1);
}

noinline int is_odd(u32 n)
{
	parity_calls++;
	if (n == 0)
		return 0;
	return is_even(n - 1);
}

noinline u64 sum_rec(u64 n)
{
	sum_calls++;
	if (n == 0)
		return 0;
	return n + sum_rec(n - 1);
}

noinline u64 ackermann(u64 m, u64 n)
{
	ack_calls++;
	if (m == 0)
		return n + 1;
	if (n == 0)
		return ackermann(m - 1, 1);
	return ackermann(m - 1, ackermann(m, n - 1));
}

static void report(const char *what, u64 arg, u64 val, u64 *calls)
{
	putstr(what);
	putch('(');
	putu64(arg);
	putstr(") = ");
	putu64(val);
	putkv("calls", *calls);
	putnl();
	*calls = 0;
}

int recurse_main(void)
{
	static const u32 fib_args[] = { 0, 1, 2, 10, 15 };
	static const u32 fact_args[] = { 0, 1, 5, 12, 20 };
	static const u32 parity_args[] = { 0, 1, 7, 10, 25 };
	unsigned i;

	for (i = 0; i < ARRAY_SIZE(fib_args); i++)
		report("fib", fib_args[i], fib(fib_args[i]), &fib_calls);
	for (i = 0; i < ARRAY_SIZE(fact_args); i++)
		report("factorial", fact_args[i], factorial(fact_args[i]), &fact_calls);
	for (i = 0; i < ARRAY_SIZE(parity_args); i++) {
		report("is_even", parity_args[i], (u64)is_even(parity_args[i]),
		       &parity_calls);
		report("is_odd", parity_args[i], (u64)is_odd(parity_args[i]),
		       &parity_calls);
	}
	report("sum_rec", 100, sum_rec(100), &sum_calls);
	putstr("ackermann(2, 3) = ");
	putu64(ackermann(2, 3));
	putkv("calls", ack_calls);
	putnl();
	ack_calls = 0;
	return 0;
}

#ifndef IN_DEMO
int main(int argc, char **argv)
{
	(void)argc;
	(void)argv;
	return recurse_main();
}
#endif
