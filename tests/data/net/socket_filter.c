/* eBPF socket filters (SEC("socket")) for tests/test_net_ebpf.py: they see the
 * same skb as the classic programs, through struct __sk_buff. */
typedef unsigned char __u8;
typedef unsigned short __u16;
typedef unsigned int __u32;

#define SEC(name) __attribute__((section(name), used))

/* The head of struct __sk_buff (uapi linux/bpf.h): offsets 0..16 */
struct __sk_buff {
	__u32 len;
	__u32 pkt_type;
	__u32 mark;
	__u32 queue_mapping;
	__u32 protocol;
};

static long (*bpf_skb_load_bytes)(const void *skb, __u32 offset, void *to, __u32 len) = (void *)26;

#define ETH_HLEN 14

/* UDP: keep the whole packet; TCP to port 80: keep 64 bytes; else drop. */
SEC("socket")
int udp_or_http(struct __sk_buff *skb)
{
	__u8 ip_proto, vihl;
	__u16 dport;

	if (skb->protocol != __builtin_bswap16(0x0800))
		return 0;
	if (bpf_skb_load_bytes(skb, ETH_HLEN + 9, &ip_proto, 1) < 0)
		return 0;
	if (ip_proto == 17)
		return skb->len;
	if (ip_proto != 6)
		return 0;
	if (bpf_skb_load_bytes(skb, ETH_HLEN, &vihl, 1) < 0)
		return 0;
	if (bpf_skb_load_bytes(skb, ETH_HLEN + (vihl & 0xf) * 4 + 2, &dport, 2) < 0)
		return 0;
	return dport == __builtin_bswap16(80) ? 64 : 0;
}

/* The legacy packet loads (LD_ABS) clang emits for load_half: IPv6 only. */
unsigned long long load_half(void *skb, unsigned long long off) asm("llvm.bpf.load.half");

SEC("socket")
int ipv6_only(struct __sk_buff *skb)
{
	return load_half(skb, 12) == 0x86dd ? 0xffff : 0;
}

/* A read past the packet through bpf_skb_load_bytes fails with -EFAULT. */
SEC("socket")
int tail_bytes(struct __sk_buff *skb)
{
	__u32 word = 0;

	if (bpf_skb_load_bytes(skb, skb->len - 2, &word, 4) < 0)
		return 1;
	return 2;
}

/* Runs past the machine's instruction budget: emu filter stops it (exit 124). */
SEC("socket")
int spin(struct __sk_buff *skb)
{
	volatile __u32 n = 0;

	for (__u32 i = 0; i < 100000000; i++)
		n += skb->len;
	return n;
}

char _license[] SEC("license") = "GPL";
