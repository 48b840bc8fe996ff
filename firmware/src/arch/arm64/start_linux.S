/* Linux user-mode entry (arm64).  At entry sp points to argc, followed by
 * argv[], NULL, envp[], NULL, auxv.  Calls main(argc, argv), then
 * exit_group(main's return value) through sys_exit. */
	.text
	.globl	_start
	.type	_start, %function
_start:
	mov	x29, #0
	mov	x30, #0
	ldr	x0, [sp]		/* argc */
	add	x1, sp, #8		/* argv */
	bl	main
	bl	sys_exit
	.size	_start, . - _start

	.section .note.GNU-stack, "", %progbits
