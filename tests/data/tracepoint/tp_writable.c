/* A writable tracepoint (TRACE_EVENT_WRITABLE): tp_req's first argument points to the
 * caller's struct req on its stack, 16 bytes that raw_tracepoint.w programs may write.
 * handle() reads the struct back after the tracepoint returns, so the output shows
 * what a program wrote: without one, every verdict and cookie is 0. */
#include <stdio.h>
#define TRACE_SYSTEM wtest
#define KEMU_CREATE_TRACE_POINTS
#include "kemu_tracepoint.h"

struct req {
	int verdict;
	int seq;
	long long cookie;
};

TRACE_EVENT_WRITABLE(tp_req,
	TP_PROTO(struct req *r, int n),
	TP_ARGS(r, n),
	TP_printk("r=%p n=%d", r, n),
	sizeof(struct req));

__attribute__((noinline)) long long handle(int n)
{
	struct req r = { .verdict = 0, .seq = n, .cookie = 0 };

	trace_tp_req(&r, n);
	printf("req %d verdict=%d cookie=%lld\n", n, r.verdict, r.cookie);
	return r.verdict + r.cookie;
}

int main(void)
{
	long long sum = 0;

	for (int n = 0; n < 4; n++)
		sum += handle(n);
	printf("sum=%lld\n", sum);
	return 0;
}
