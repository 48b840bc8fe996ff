"""x86-64 kprobes (arch/x86/kernel/kprobes): decode, emulate, core."""
