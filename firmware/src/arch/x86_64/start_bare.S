/* Bare-metal entry (x86-64).  The emulator enters here in 64-bit long mode
 * with rsp = 0x8000000.  We (re)load the same stack top, zero .bss, call
 * main(0, 0), then write main's return value to the exit port (0xf4). */
	.section .text.boot, "ax", @progbits
	.globl	_start
	.type	_start, @function
_start:
	mov	$__stack_top, %rsp
	xor	%ebp, %ebp
	cld
	lea	__bss_start(%rip), %rdi
	lea	__bss_end(%rip), %rcx
	sub	%rdi, %rcx
	xor	%eax, %eax
	rep stosb
	xor	%edi, %edi		/* argc = 0 */
	xor	%esi, %esi		/* argv = NULL */
	call	main
	mov	%eax, %edi
	call	sys_exit		/* outl %eax, $0xf4 */
1:	hlt
	jmp	1b
	.size	_start, . - _start

/* Always present so the RW PT_LOAD segment is never empty. */
	.data
	.p2align 3
	.globl	boot_magic
	.type	boot_magic, @object
boot_magic:
	.ascii	"kprobemu"
	.size	boot_magic, 8

	.section .note.GNU-stack, "", @progbits
