"""arm64 kprobes (arch/arm64/kernel/probes): decode-insn, simulate-insn, kprobes."""
