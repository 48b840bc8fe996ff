/* Event output: ring buffer reserve/submit/discard and output, and a perf
 * event array. */
#include "bpf_mini.h"

struct event {
	u32 pid;
	u32 cpu;
	u64 arg;
	char comm[16];
};

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 4096);
} events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERF_EVENT_ARRAY);
	__uint(key_size, sizeof(u32));
	__uint(value_size, sizeof(u32));
} perf_out SEC(".maps");

SEC("kprobe/do_exit")
int emit(struct pt_regs *ctx)
{
	struct event *e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);

	if (!e)
		return 1;
	e->pid = bpf_get_current_pid_tgid() >> 32;
	e->cpu = bpf_get_smp_processor_id();
	e->arg = PT_REGS_PARM1(ctx);
	bpf_get_current_comm(e->comm, sizeof(e->comm));
	if (e->arg == 0) {
		bpf_ringbuf_discard(e, 0);
		return 2;
	}
	bpf_ringbuf_submit(e, 0);

	u64 marker = 0xfeedULL;
	bpf_ringbuf_output(&events, &marker, sizeof(marker), 0);
	bpf_perf_event_output(ctx, &perf_out, BPF_F_CURRENT_CPU, &marker, sizeof(marker));
	return 0;
}

char LICENSE[] SEC("license") = "GPL";
