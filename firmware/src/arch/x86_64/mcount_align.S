/* Linked into the x86-64 *.ftrace.elf images only: gcc emits __mcount_loc
 * without alignment; this empty input section raises the output section's
 * alignment to 8 so the table of 8-byte fentry addresses is naturally
 * aligned (as in the kernel, whose linker script does ALIGN(8)). */
	.section __mcount_loc, "a", @progbits
	.p2align 3

	.section .note.GNU-stack, "", @progbits
