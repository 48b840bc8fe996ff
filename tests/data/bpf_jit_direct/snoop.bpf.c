/* An opensnoop-shaped program for the helpers JITed programs call from guest code
 * (tests/test_bpf_jit_direct_helpers.py): on each do_sys_open (firmware) or lookup
 * (victim.c), current's pid/tgid, uid/gid, comm and CPU, the path argument read with
 * bpf_probe_read_user_str into the stack and into a map value, a read of an unmapped
 * address (-EFAULT, zeroed), a bpf_printk of a string on the stack and one in the map
 * value, then the event as a ring-buffer record and as a perf sample (ctx in r1): in the
 * order the host path delivers a hit's output (jit_direct.output_order). */
#include "common.h"

struct event {
	__u32 tgid;
	__u32 pid;
	__u64 uid_gid;
	__s64 len;
	__s64 bad;
	__u64 word;
	__u32 cpu;
	__u32 arg;
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

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct event);
} last SEC(".maps");

static int snoop(struct pt_regs *ctx, const char *path, __u32 arg)
{
	struct event e = {};
	__u64 id = bpf_get_current_pid_tgid();
	__u32 zero = 0;
	struct event *v;

	e.tgid = id >> 32;
	e.pid = (__u32)id;
	e.uid_gid = bpf_get_current_uid_gid();
	e.cpu = bpf_get_smp_processor_id();
	e.arg = arg;
	bpf_get_current_comm(e.comm, sizeof(e.comm));
	e.len = bpf_probe_read_user_str(e.name, sizeof(e.name), path);
	e.word = 0x5a5a5a5a5a5a5a5aULL;
	e.bad = bpf_probe_read_kernel(&e.word, sizeof(e.word), (void *)16);
	v = bpf_map_lookup_elem(&last, &zero);
	if (v) {
		v->len = bpf_probe_read_user_str(v->name, sizeof(v->name), path);
		v->arg = arg;
		bpf_printk("map %s %d", v->name, v->len);
	}
	bpf_printk("open %s comm %s arg %x", e.name, e.comm, arg);
	bpf_ringbuf_output(&events, &e, sizeof(e), 0);
	bpf_perf_event_output(ctx, &samples, BPF_F_CURRENT_CPU, &e, sizeof(e));
	return 0;
}

SEC("kprobe/do_sys_open")
int snoop_open(struct pt_regs *ctx)
{
	return snoop(ctx, (const char *)PT_REGS_PARM2(ctx), (__u32)PT_REGS_PARM3(ctx));
}

SEC("kprobe/lookup")
int snoop_lookup(struct pt_regs *ctx)
{
	return snoop(ctx, (const char *)PT_REGS_PARM1(ctx), (__u32)PT_REGS_PARM2(ctx));
}

SEC("kretprobe/do_sys_open")
int snoop_ret(struct pt_regs *ctx)
{
	__s64 rc = PT_REGS_RC(ctx);

	bpf_perf_event_output(ctx, &samples, BPF_F_CURRENT_CPU, &rc, sizeof(rc));
	return 0;
}
