/* Writable raw tracepoint programs on tp_writable.c's tp_req(struct req *r, int n),
 * whose bpf_raw_event_map has writable_size 16 (sizeof(struct req)):
 *   set_verdict  raw_tracepoint.w/tp_req: writes r->verdict and r->cookie from what it
 *                reads in the buffer and ctx[1]; the guest prints them
 *   write_past   raw_tp.w/tp_req writing byte 16: attach must refuse it (-EINVAL)
 *   read_far     raw_tp.w/tp_req reading ctx[2] of a 2-argument tracepoint: refused too
 *   plain_write  (built with -DPLAIN_WRITE) raw_tp/tp_req storing through ctx[0]: an
 *                ordinary raw tracepoint's arguments are scalars, so the verifier
 *                refuses the object at load */
#include <linux/types.h>
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

char LICENSE[] SEC("license") = "GPL";

struct req {
	int verdict;
	int seq;
	long long cookie;
};

SEC("raw_tracepoint.w/tp_req")
int set_verdict(__u64 *ctx)
{
	struct req *r = (struct req *)ctx[0];

	r->verdict = r->seq * 10 + 1;
	r->cookie = (long long)ctx[1] * 1000 + 7;
	return 0;
}

SEC("raw_tp.w/tp_req")
int write_past(__u64 *ctx)
{
	char *b = (char *)ctx[0];

	b[16] = 1;
	return 0;
}

SEC("raw_tp.w/tp_req")
int read_far(__u64 *ctx)
{
	struct req *r = (struct req *)ctx[0];

	r->verdict = (int)ctx[2];
	return 0;
}

#ifdef PLAIN_WRITE
SEC("raw_tp/tp_req")
int plain_write(__u64 *ctx)
{
	struct req *r = (struct req *)ctx[0];

	r->verdict = 1;
	return 0;
}
#endif
