"""The trace layer (kernel/trace/): kprobe_events, fetch args, the ring buffer, trace output,
event filters and a tracefs per machine. bpf_trace.py (BPF on every hit) lives beside it."""
