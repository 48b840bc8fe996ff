/* Programs on hot_leaf (firmware hotloop) for tests/test_machine_nested_limits.py:
 * on_leaf_stack needs the host on every hit (bpf_get_stack: a nested run per hit under
 * --bpf-engine jit); on_leaf_count only on its first (then the direct path). */
#include "../bpf_trace/common.h"

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} hits SEC(".maps");

static __always_inline void count(void)
{
	__u32 zero = 0;
	__u64 *v = bpf_map_lookup_elem(&hits, &zero);

	if (v)
		__sync_fetch_and_add(v, 1);
}

SEC("kprobe/hot_leaf")
int on_leaf_stack(struct pt_regs *ctx)
{
	__u64 ips[4] = {};

	count();
	return bpf_get_stack(ctx, ips, sizeof(ips), 0) < 0;
}

SEC("kprobe/hot_leaf")
int on_leaf_count(struct pt_regs *ctx)
{
	count();
	return 0;
}
