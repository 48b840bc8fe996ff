"""Linux user mode for static binaries: process image, file descriptors, syscalls."""
