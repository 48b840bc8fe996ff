"""The trace layer over the probe core (kernel/trace/): kprobe events, ring buffer and
output, filters, and BPF programs on probe hits (bpf_trace)."""
