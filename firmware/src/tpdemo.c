/*
 * tpdemo.c - static tracepoints (firmware/include/kemu_tracepoint.h).
 *   tp_work(i, v)   fires once per iteration of work_loop, v = i * 3 - 7
 *   tp_done(n, sum) fires once at the end
 * Usage: tpdemo [N]   N iterations (default 16).  Output does not depend on
 * whether the tracepoints are enabled.
 */
#include "platform.h"
#define TRACE_SYSTEM tpdemo
#define KEMU_CREATE_TRACE_POINTS
#include "kemu_tracepoint.h"

TRACE_EVENT(tp_work,
	TP_PROTO(int i, long v),
	TP_ARGS(i, v),
	TP_printk("i=%d v=%ld", i, v));

TRACE_EVENT(tp_done,
	TP_PROTO(unsigned long n, unsigned long sum),
	TP_ARGS(n, sum),
	TP_printk("n=%lu sum=%lu", n, sum));

noinline long work_step(int i)
{
	long v = (long)i * 3 - 7;

	trace_tp_work(i, v);
	return v;
}

noinline u64 work_loop(u64 n)
{
	u64 sum = 0, i;

	for (i = 0; i < n; i++)
		sum += (u64)work_step((int)i);
	trace_tp_done(n, sum);
	return sum;
}

int main(int argc, char **argv)
{
	u64 n = argc > 1 ? parse_u64(argv[1], 16) : 16;

	putstr("tpdemo");
	putkv("n", n);
	putkv("sum", work_loop(n));
	putnl();
	return 0;
}
