/* Per-CPU state seen from a kprobe on percpu.c's work(): a per-CPU array counts the hits of
 * each CPU without atomics, and a plain array keyed by bpf_get_smp_processor_id() must count
 * the same; every thread's bpf_get_current_pid_tgid() names it (low half) and its process
 * (high half). */
#include "../bpf_trace/common.h"

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} hits SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 8);
	__type(key, __u32);
	__type(value, __u64);
} by_cpu SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16);
	__type(key, __u32);
	__type(value, __u32);
} tgid_of SEC(".maps");

SEC("kprobe/work")
int on_work(struct pt_regs *ctx)
{
	__u32 zero = 0, cpu = bpf_get_smp_processor_id();
	__u64 *v = bpf_map_lookup_elem(&hits, &zero), pid_tgid = bpf_get_current_pid_tgid();
	__u32 pid = pid_tgid, tgid = pid_tgid >> 32;

	bpf_map_update_elem(&tgid_of, &pid, &tgid, BPF_ANY);

	if (v)
		*v += 1;
	v = bpf_map_lookup_elem(&by_cpu, &cpu);
	if (v)
		__sync_fetch_and_add(v, 1);
	return 0;
}
