/* Bare-metal entry (arm64, EL1).  The emulator enters here with
 * sp = 0x48000000.  We (re)load the same stack top, enable FP/SIMD access
 * (CPACR_EL1.FPEN = 0b11; the firmware itself is built general-regs-only),
 * zero .bss, call main(0, 0), then store main's return value to the exit
 * device at 0x09100000. */
	.section .text.boot, "ax", %progbits
	.globl	_start
	.type	_start, %function
_start:
	ldr	x0, =__stack_top
	mov	sp, x0
	mov	x0, #(3 << 20)
	msr	cpacr_el1, x0
	isb
	adrp	x0, __bss_start
	add	x0, x0, :lo12:__bss_start
	adrp	x1, __bss_end
	add	x1, x1, :lo12:__bss_end
1:	cmp	x0, x1
	b.hs	2f
	str	xzr, [x0], #8
	b	1b
2:	mov	x29, #0
	mov	x30, #0
	mov	x0, #0			/* argc = 0 */
	mov	x1, #0			/* argv = NULL */
	bl	main
	bl	sys_exit		/* str w0, [0x09100000] */
3:	wfi
	b	3b
	.size	_start, . - _start
	.ltorg

/* Always present so the RW PT_LOAD segment is never empty. */
	.data
	.p2align 3
	.globl	boot_magic
	.type	boot_magic, %object
boot_magic:
	.ascii	"kprobemu"
	.size	boot_magic, 8

	.section .note.GNU-stack, "", %progbits
