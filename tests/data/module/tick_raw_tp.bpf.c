/* A raw tracepoint program on tp_mod.c's mod_tick(long v): hits and the sum of v. */
#include <linux/types.h>
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

char LICENSE[] SEC("license") = "GPL";

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 2);
	__type(key, __u32);
	__type(value, __u64);
} ticks SEC(".maps");

SEC("raw_tp/mod_tick")
int count_tick(__u64 *ctx)
{
	__u32 k0 = 0, k1 = 1;
	__u64 *n = bpf_map_lookup_elem(&ticks, &k0);
	__u64 *sum = bpf_map_lookup_elem(&ticks, &k1);

	if (n)
		__sync_fetch_and_add(n, 1);
	if (sum)
		__sync_fetch_and_add(sum, ctx[0]);
	return 0;
}
