/* Linux user-mode entry (x86-64).  At entry rsp points to argc, followed by
 * argv[], NULL, envp[], NULL, auxv.  Calls main(argc, argv), then
 * exit_group(main's return value) through sys_exit. */
	.text
	.globl	_start
	.type	_start, @function
_start:
	xor	%ebp, %ebp
	mov	(%rsp), %rdi		/* argc */
	lea	8(%rsp), %rsi		/* argv */
	and	$-16, %rsp
	call	main
	mov	%eax, %edi
	call	sys_exit
	hlt
	.size	_start, . - _start

	.section .note.GNU-stack, "", @progbits
