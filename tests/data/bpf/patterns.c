/* Typical tracing-tool patterns: a struct key with the task name, a
 * log2 histogram loop, a string-prefix subprogram, insert-then-lookup. */
#include "bpf_mini.h"

struct key { u32 pid; char comm[16]; };
struct val { u64 count; u64 bytes; u64 hist[8]; };

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 128);
	__type(key, struct key);
	__type(value, struct val);
} stats SEC(".maps");

static __always_inline int log2l(u64 v)
{
	int r = 0;
	for (int i = 0; i < 63; i++) {
		if (v >> 1 == 0) break;
		v >>= 1; r++;
	}
	return r;
}

static __noinline int strprefix(const char *a, const char *b, int n)
{
	for (int i = 0; i < n; i++) {
		if (a[i] != b[i]) return 0;
		if (a[i] == 0) return 1;
	}
	return 1;
}

SEC("kprobe/vfs_write")
int on_write(struct pt_regs *ctx)
{
	struct key k = {};
	struct val zero = {}, *v;
	u64 size = PT_REGS_PARM2(ctx);
	char want[4] = "bas";

	k.pid = bpf_get_current_pid_tgid() >> 32;
	bpf_get_current_comm(k.comm, sizeof(k.comm));
	if (!strprefix(k.comm, want, 3))
		return 0;
	v = bpf_map_lookup_elem(&stats, &k);
	if (!v) {
		bpf_map_update_elem(&stats, &k, &zero, BPF_NOEXIST);
		v = bpf_map_lookup_elem(&stats, &k);
		if (!v) return 0;
	}
	v->count++;
	v->bytes += size;
	int slot = log2l(size);
	if (slot > 7) slot = 7;
	if (slot >= 0)
		v->hist[slot]++;
	return 0;
}

SEC("kretprobe/vfs_write")
int on_write_ret(struct pt_regs *ctx)
{
	long rc = PT_REGS_RC(ctx);

	return rc < 0 ? -rc : 0;
}

char LICENSE[] SEC("license") = "GPL";
