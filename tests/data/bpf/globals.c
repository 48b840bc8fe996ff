/* Global data: .data, .rodata (const volatile, set before load), .bss,
 * and a string literal in .rodata.str1.1. */
#include "bpf_mini.h"

const volatile u32 target_pid = 0;   /* .rodata */
u64 hits = 0;                        /* .bss */
u64 last_arg = 0;                    /* .bss */
u32 scale = 3;                       /* .data */
char tag[8] = "emu";                 /* .data */

SEC("kprobe/vfs_read")
int read_entry(struct pt_regs *ctx)
{
	u32 pid = bpf_get_current_pid_tgid() >> 32;

	if (target_pid && pid != target_pid)
		return 0;
	hits += 1;
	last_arg = PT_REGS_PARM1(ctx) * scale;
	tag[3] = '!';
	bpf_printk("pid %d hit %llu", pid, hits);
	return hits;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
