/* A user program with its own static tracepoints (glibc, static): kemu_tracepoint.h
 * needs nothing but -I firmware/include.  Prints the same with tracepoints on or off. */
#include <stdio.h>
#define KEMU_CREATE_TRACE_POINTS
#include "kemu_tracepoint.h"

TRACE_EVENT(user_mix,
	TP_PROTO(signed char c, unsigned short h, int i, void *p),
	TP_ARGS(c, h, i, p),
	TP_printk("c=%d h=%u i=%d p=%p", c, h, i, p));

static int table[4];

__attribute__((noinline)) int step(int k)
{
	trace_user_mix((signed char)(k - 2), (unsigned short)(60000 + k), -k * 1000,
		       &table[k & 3]);
	table[k & 3] += k;
	return table[k & 3];
}

int main(void)
{
	int s = 0;

	for (int k = 0; k < 6; k++)
		s += step(k);
	printf("user s=%d\n", s);
	return 0;
}
