/* The usual per-CPU tracing counter, on a kprobe at tests/data/smp/percpu.c's work(id, i):
 * a per-CPU array counts the calls of each i % 4 and sums i without atomics (each CPU
 * writes its own copy), a per-CPU scratch slot holds the last i, and a per-CPU hash counts
 * the hits of each CPU under its own id. On the native hit path every lookup runs from the
 * guest stub (the hash's values are C's, mapped into the guest); without it the per-CPU
 * hash keeps Python storage and the program takes nested runs. */
#include "../bpf_trace/common.h"

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 4);
	__type(key, __u32);
	__type(value, __u64[2]);
} counts SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} scratch SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, 8);
	__type(key, __u32);
	__type(value, __u64);
} by_cpu SEC(".maps");

SEC("kprobe/work")
int count_work(struct pt_regs *ctx)
{
	__u64 i = PT_REGS_PARM2(ctx), one = 1;
	__u32 key = i % 4, zero = 0, cpu = bpf_get_smp_processor_id();
	__u64 *v = bpf_map_lookup_elem(&counts, &key), *last = bpf_map_lookup_elem(&scratch, &zero);
	__u64 *n = bpf_map_lookup_elem(&by_cpu, &cpu);

	if (v) {
		v[0] += 1;
		v[1] += i;
	}
	if (last)
		*last = i;
	if (n)
		*n += 1;
	else
		bpf_map_update_elem(&by_cpu, &cpu, &one, BPF_NOEXIST);
	return 0;
}
