/* A stack-id map: one stack per distinct call chain into leaf (victim.c). */
#include "common.h"

struct {
	__uint(type, BPF_MAP_TYPE_STACK_TRACE);
	__uint(max_entries, 64);
	__uint(key_size, sizeof(__u32));
	__uint(value_size, 16 * sizeof(__u64));
} stacks SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 64);
	__type(key, __s32);
	__type(value, __u64);
} hits SEC(".maps");

SEC("kprobe/leaf")
int on_leaf(struct pt_regs *ctx)
{
	__s32 id = bpf_get_stackid(ctx, &stacks, 0);
	__u64 one = 1, *v = bpf_map_lookup_elem(&hits, &id);

	if (v)
		__sync_fetch_and_add(v, 1);
	else
		bpf_map_update_elem(&hits, &id, &one, BPF_NOEXIST);
	return 0;
}

/* bpf_get_stack: the raw frames of each call of middle, to user space. */
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 4096);
} frames SEC(".maps");

SEC("kprobe/middle")
int on_middle(struct pt_regs *ctx)
{
	struct { __s64 n; __u64 ips[6]; } rec = {};

	rec.n = bpf_get_stack(ctx, rec.ips, sizeof(rec.ips), 0);
	bpf_ringbuf_output(&frames, &rec, sizeof(rec), 0);
	return 0;
}
