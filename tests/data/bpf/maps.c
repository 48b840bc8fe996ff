/* Counts calls per pid in a BTF-defined hash, totals in an array and a
 * per-CPU array: exercises map relocations and the map helpers. */
#include "bpf_mini.h"

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 64);
	__type(key, u32);
	__type(value, u64);
} counts SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 4);
	__type(key, u32);
	__type(value, u64);
} totals SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__uint(key_size, sizeof(u32));
	__uint(value_size, sizeof(u64));
} percpu SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 2);
	__type(key, u64);
	__type(value, u32);
} recent SEC(".maps");

SEC("kprobe/do_sys_openat2")
int count_opens(struct pt_regs *ctx)
{
	u32 pid = bpf_get_current_pid_tgid();
	u64 one = 1, *val;
	u32 zero = 0, idx = 1;

	val = bpf_map_lookup_elem(&counts, &pid);
	if (val)
		__sync_fetch_and_add(val, 1);
	else
		bpf_map_update_elem(&counts, &pid, &one, BPF_NOEXIST);

	val = bpf_map_lookup_elem(&totals, &zero);
	if (val)
		*val += PT_REGS_PARM2(ctx);
	val = bpf_map_lookup_elem(&totals, &idx);
	if (val)
		(*val)++;
	val = bpf_map_lookup_elem(&percpu, &zero);
	if (val)
		*val += 10;

	u64 key = PT_REGS_PARM1(ctx);
	u32 seen = pid;
	bpf_map_update_elem(&recent, &key, &seen, BPF_ANY);
	return 0;
}

char LICENSE[] SEC("license") = "GPL";
