/* Raw tracepoint and tracepoint programs on tpdemo's tp_work(int i, long v):
 *   count_raw   raw_tp/tp_work: hits per (i % 4) in by_mod (u64 args, zero-extended),
 *               and the last v seen
 *   count_rec   tracepoint/tpdemo/tp_work: the record's i (offset 8) summed
 *   too_far     raw_tp/tp_work reading ctx[2]: attach must refuse it (2 arguments) */
#include <linux/types.h>
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

char LICENSE[] SEC("license") = "GPL";

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 4);
	__type(key, __u32);
	__type(value, __u64);
} by_mod SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 2);
	__type(key, __u32);
	__type(value, __u64);
} seen SEC(".maps");

SEC("raw_tp/tp_work")
int count_raw(__u64 *ctx)
{
	__u32 key = ctx[0] % 4, last = 0;
	__u64 *v = bpf_map_lookup_elem(&by_mod, &key);

	if (v)
		__sync_fetch_and_add(v, 1);
	bpf_map_update_elem(&seen, &last, &ctx[1], BPF_ANY);
	return 0;
}

struct tp_work_rec {
	__u64 common;
	int i;
	int pad;
	long v;
};

SEC("tracepoint/tpdemo/tp_work")
int count_rec(struct tp_work_rec *rec)
{
	__u32 key = 1;
	__u64 *sum = bpf_map_lookup_elem(&seen, &key);

	if (sum)
		__sync_fetch_and_add(sum, (__u64)rec->i);
	return 1;
}

SEC("raw_tp/tp_work")
int too_far(__u64 *ctx)
{
	__u32 key = 0;

	bpf_map_update_elem(&seen, &key, &ctx[2], BPF_ANY);
	return 0;
}

/* tp_user.c's user_mix(signed char c, unsigned short h, int i, void *p): the last
 * negative c and the last i as the program sees them (zero-extended from their size) */
SEC("raw_tp/user_mix")
int mix_args(__u64 *ctx)
{
	__u32 k0 = 0, k1 = 1;

	if (ctx[0] > 127)
		bpf_map_update_elem(&seen, &k0, &ctx[0], BPF_ANY);
	bpf_map_update_elem(&seen, &k1, &ctx[2], BPF_ANY);
	return 0;
}
