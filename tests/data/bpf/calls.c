/* BPF-to-BPF calls: static noinline functions in .text, one calling
 * another, called from two programs. */
#include "bpf_mini.h"

static __noinline u64 square(u64 x)
{
	return x * x;
}

static __noinline u64 sum_squares(u64 a, u64 b, u64 c)
{
	u64 buf[4] = {a, b, c, 0};   /* the callee's own stack frame */

	return square(buf[0]) + square(buf[1]) + square(buf[2]);
}

static __noinline int fib(int n)
{
	int a = 0, b = 1;

	for (int i = 0; i < n && i < 90; i++) {
		int t = a + b;
		a = b;
		b = t;
	}
	return a;
}

SEC("kprobe/calc")
int calc(struct pt_regs *ctx)
{
	u64 keep = PT_REGS_PARM1(ctx) + 1;   /* lives across the calls in r6-r9 */

	return sum_squares(PT_REGS_PARM1(ctx), PT_REGS_PARM2(ctx), 3) + keep;
}

SEC("tracepoint/sched/sched_switch")
int fib_tp(void *ctx)
{
	return fib(20) + square(2);
}

char LICENSE[] SEC("license") = "GPL";
