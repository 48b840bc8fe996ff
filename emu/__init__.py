"""kprobe-emu's machine: arm64 and x86-64 guests on Unicorn (see README.md)."""
