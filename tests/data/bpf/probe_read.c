/* Reading guest memory through probe_read helpers, the task helpers,
 * stack ids and override_return: what a kprobe program does on a hit. */
#include "bpf_mini.h"

struct {
	__uint(type, BPF_MAP_TYPE_STACK_TRACE);
	__uint(max_entries, 16);
	__uint(key_size, sizeof(u32));
	__uint(value_size, 8 * sizeof(u64));
} stacks SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16);
	__type(key, u32);
	__type(value, char[32]);
} names SEC(".maps");

SEC("kprobe/do_sys_openat2")
int trace_open(struct pt_regs *ctx)
{
	char path[32] = {};
	u64 word = 0;
	u32 key = bpf_get_current_pid_tgid();
	long n;

	n = bpf_probe_read_kernel_str(path, sizeof(path), (void *)PT_REGS_PARM2(ctx));
	if (n < 0)
		return -1;
	bpf_probe_read_kernel(&word, sizeof(word), (void *)PT_REGS_PARM2(ctx));
	bpf_map_update_elem(&names, &key, path, BPF_ANY);
	bpf_get_stackid(ctx, &stacks, 0);
	if ((u32)word == 0x6374652f)   /* starts with "/etc" */
		bpf_override_return(ctx, -13);
	return n + (bpf_get_func_ip(ctx) == 0xffffffff81000000ULL ? 1000 : 0);
}

char LICENSE[] SEC("license") = "GPL";
