/* bpf_override_return: check_perm (on victim.c's error-injection list) returns 0
 * at once; not_listed is not on the list, so attaching force_not_listed fails. */
#include "common.h"

SEC("kprobe/check_perm")
int force_ok(struct pt_regs *ctx)
{
	if (PT_REGS_PARM1(ctx) == 1000)
		bpf_override_return(ctx, 0);
	return 0;
}

SEC("kprobe/not_listed")
int force_not_listed(struct pt_regs *ctx)
{
	bpf_override_return(ctx, 7);
	return 0;
}
