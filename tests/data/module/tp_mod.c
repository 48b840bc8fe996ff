/* A guest module (ET_REL) bringing its own static tracepoint: loaded, its tracepoint and
 * raw tracepoint join the machine's; unloaded, they leave. */
#define KEMU_CREATE_TRACE_POINTS
#include "kemu_tracepoint.h"

TRACE_EVENT(mod_tick,
	TP_PROTO(long v),
	TP_ARGS(v),
	TP_printk("v=%ld", v));

long mod_tick_fire(long v)
{
	trace_mod_tick(v);
	return v + 1;
}

int init_module(void)
{
	return 0;
}

void cleanup_module(void)
{
}
