/* Count do_sys_open calls per flags argument (PT_REGS_PARM3) in a hash map, and
 * do_sys_open return values per value in another (kretprobe). */
#include "common.h"

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 64);
	__type(key, __u32);
	__type(value, __u64);
} by_flags SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 64);
	__type(key, __s64);
	__type(value, __u64);
} by_ret SEC(".maps");

static void bump(void *map, const void *key)
{
	__u64 one = 1, *v = bpf_map_lookup_elem(map, key);

	if (v)
		__sync_fetch_and_add(v, 1);
	else
		bpf_map_update_elem(map, key, &one, BPF_NOEXIST);
}

SEC("kprobe/do_sys_open")
int count_flags(struct pt_regs *ctx)
{
	__u32 flags = (__u32)PT_REGS_PARM3(ctx);

	bump(&by_flags, &flags);
	return 0;
}

SEC("kretprobe/do_sys_open")
int count_ret(struct pt_regs *ctx)
{
	__s64 ret = (__s64)PT_REGS_RC(ctx);

	bump(&by_ret, &ret);
	return 0;
}
