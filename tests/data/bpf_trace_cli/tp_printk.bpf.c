/* A tracepoint program on the tpdemo firmware's tpdemo/tp_work: one line per hit. */
#include <linux/types.h>
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

char LICENSE[] SEC("license") = "GPL";

struct tp_work_rec {
	__u64 common;
	int i;
	int pad;
	long v;
};

SEC("tracepoint/tpdemo/tp_work")
int pr(struct tp_work_rec *rec)
{
	bpf_printk("hello %d", rec->i);
	return 0;
}
