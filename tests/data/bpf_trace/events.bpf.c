/* Ring-buffer records and perf samples from kprobes on do_sys_open (firmware) or
 * lookup (victim.c): the string argument read with bpf_probe_read_user_str, a read of
 * an unmapped address (-EFAULT), pid, comm, func_ip, ktime; one bpf_printk per hit. */
#include "common.h"

struct event {
	__u32 pid;
	__u32 mode;
	__u64 func_ip;
	__u64 ts;
	__s64 len;
	__s64 bad;
	char comm[16];
	char name[32];
};

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 4096);
} events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERF_EVENT_ARRAY);
	__uint(key_size, sizeof(__u32));
	__uint(value_size, sizeof(__u32));
} samples SEC(".maps");

static int emit(struct pt_regs *ctx, const char *path, __u32 mode)
{
	struct event *e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
	__u64 word = 0;

	if (!e)
		return 0;
	e->pid = bpf_get_current_pid_tgid() >> 32;
	e->mode = mode;
	e->func_ip = bpf_get_func_ip(ctx);
	e->ts = bpf_ktime_get_ns();
	e->len = bpf_probe_read_user_str(e->name, sizeof(e->name), path);
	e->bad = bpf_probe_read_user(&word, sizeof(word), (void *)16);
	bpf_get_current_comm(e->comm, sizeof(e->comm));
	bpf_printk("open %s mode %d", e->name, mode);
	bpf_ringbuf_submit(e, 0);
	return 0;
}

SEC("kprobe/do_sys_open")
int on_open(struct pt_regs *ctx)
{
	return emit(ctx, (const char *)PT_REGS_PARM2(ctx), (__u32)PT_REGS_PARM3(ctx));
}

SEC("kprobe/lookup")
int on_lookup(struct pt_regs *ctx)
{
	return emit(ctx, (const char *)PT_REGS_PARM1(ctx), (__u32)PT_REGS_PARM2(ctx));
}

SEC("kretprobe/lookup")
int on_lookup_ret(struct pt_regs *ctx)
{
	__s64 rc = PT_REGS_RC(ctx);

	bpf_perf_event_output(ctx, &samples, BPF_F_CURRENT_CPU, &rc, sizeof(rc));
	return 0;
}
