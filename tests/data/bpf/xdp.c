/* Packet parsing with direct packet access: drops UDP to port 53. */
#include "bpf_mini.h"

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 2);
	__type(key, u32);
	__type(value, u64);
} verdicts SEC(".maps");

SEC("xdp")
int xdp_filter(struct xdp_md *ctx)
{
	u8 *data = (u8 *)(long)ctx->data;
	u8 *end = (u8 *)(long)ctx->data_end;
	u32 key = 0;

	if (data + 14 + 20 + 8 > end)
		return XDP_ABORTED;
	if (data[12] != 0x08 || data[13] != 0x00 || data[14 + 9] != 17)
		return XDP_PASS;
	u8 *udp = data + 14 + ((data[14] & 0xf) << 2);
	if (udp + 8 > end)
		return XDP_ABORTED;
	if (udp[2] == 0 && udp[3] == 53) {
		key = 1;
		u64 *v = bpf_map_lookup_elem(&verdicts, &key);
		if (v)
			*v += 1;
		return XDP_DROP;
	}
	return XDP_PASS;
}

char LICENSE[] SEC("license") = "GPL";
