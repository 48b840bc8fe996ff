/* Shared includes: uapi bpf.h, asm/ptrace.h of the target arch (compile with
 * -D__TARGET_ARCH_x86 or -D__TARGET_ARCH_arm64 and that arch's include dir). */
#include <linux/types.h>
#include <linux/bpf.h>
#include <asm/ptrace.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

char LICENSE[] SEC("license") = "GPL";
