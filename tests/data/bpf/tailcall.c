/* Tail calls through a prog_array: a dispatcher jumps to a handler chosen
 * by the first argument; handlers record where control went. */
#include "bpf_mini.h"

struct {
	__uint(type, BPF_MAP_TYPE_PROG_ARRAY);
	__uint(max_entries, 4);
	__uint(key_size, sizeof(u32));
	__uint(value_size, sizeof(u32));
} jump_table SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 4);
	__type(key, u32);
	__type(value, u64);
} visited SEC(".maps");

static __always_inline void mark(u32 slot)
{
	u64 *v = bpf_map_lookup_elem(&visited, &slot);

	if (v)
		*v += 1;
}

SEC("kprobe/dispatch")
int dispatcher(struct pt_regs *ctx)
{
	mark(0);
	bpf_tail_call(ctx, &jump_table, (u32)PT_REGS_PARM1(ctx));
	return 100;   /* only when the slot is empty */
}

SEC("kprobe/handler_a")
int handler_a(struct pt_regs *ctx)
{
	mark(1);
	return 1;
}

SEC("kprobe/handler_b")
int handler_b(struct pt_regs *ctx)
{
	mark(2);
	bpf_tail_call(ctx, &jump_table, 0);   /* chain on to handler_a */
	return 2;
}

char LICENSE[] SEC("license") = "GPL";
