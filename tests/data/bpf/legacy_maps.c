/* A legacy "maps" section (struct bpf_map_def) and the old "version". */
#include "bpf_mini.h"

struct bpf_map_def {
	unsigned int type, key_size, value_size, max_entries, map_flags;
};

struct bpf_map_def SEC("maps") legacy_counts = {
	.type = BPF_MAP_TYPE_HASH, .key_size = 4, .value_size = 8, .max_entries = 8,
};

SEC("socket")
int sock_prog(void *skb)
{
	u32 key = 7;
	u64 init = 42, *v;

	v = bpf_map_lookup_elem(&legacy_counts, &key);
	if (!v) {
		bpf_map_update_elem(&legacy_counts, &key, &init, BPF_ANY);
		return 0;
	}
	return *v;
}

char LICENSE[] SEC("license") = "GPL";
unsigned int VERSION SEC("version") = 0x050a00;
