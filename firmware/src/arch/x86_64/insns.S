/*
 * insns.S (x86-64) - one small function per instruction class that x86
 * kprobes must emulate, fix up (RIP-relative), single-step or reject
 * (arch/x86/kernel/kprobes/core.c).  Written in assembly so the compiler
 * cannot remove or change them.  Called from insns.c.
 *
 * Conventions: SysV ABI, rdi/rsi/rdx arguments, result in rax.  The data
 * read/written RIP-relative lives in .data/.rodata below.  No function
 * relies on the red zone.  Every function has a .size.
 */
	.text

#define FUNC(name)		\
	.globl	name;		\
	.type	name, @function;\
	.p2align 4;		\
name:

#define ENDF(name)	.size name, . - name

/* u64 t_rip_load(u64 x): x + t_data_q, MOV with a RIP-relative load */
FUNC(t_rip_load)
	mov	t_data_q(%rip), %rax		/* 48 8b 05 disp32 */
	add	%rdi, %rax
	movzbl	t_data_b(%rip), %ecx		/* 0f b6 0d disp32 */
	add	%rcx, %rax
	ret
ENDF(t_rip_load)

/* u64 t_rip_store(u64 x): stores 2x to t_store_q, 0x5a5a5a5a to
 * t_store_l and 0x77 to t_store_b (RIP-relative stores, the last two with
 * an immediate after the displacement); returns t_store_q re-read */
FUNC(t_rip_store)
	lea	(%rdi,%rdi), %rax
	mov	%rax, t_store_q(%rip)		/* 48 89 05 disp32 */
	movl	$0x5a5a5a5a, t_store_l(%rip)	/* c7 05 disp32 imm32 */
	movb	$0x77, t_store_b(%rip)		/* c6 05 disp32 imm8 */
	mov	t_store_q(%rip), %rax
	ret
ENDF(t_rip_store)

/* u64 t_rip_lea(void): address of t_data_q via LEA rip-relative */
FUNC(t_rip_lea)
	lea	t_data_q(%rip), %rax		/* 48 8d 05 disp32 */
	ret
ENDF(t_rip_lea)

/* u64 t_rip_cmp(u64 x): ALU ops with RIP-relative memory operands.
 *   bit0  = (x == t_data_q)                cmp  mem, reg
 *   bit1  = (t_data_l == 0x12345678)       cmpl $imm32, mem
 *   bit2  = (t_data_b & 0x80) != 0         testb $imm8, mem
 *   bits 8.. = (x + t_data_q) >> 56        add  mem, reg
 * also increments t_counter_q              addq $1, mem (read-modify-write) */
FUNC(t_rip_cmp)
	xor	%eax, %eax
	cmp	t_data_q(%rip), %rdi		/* 48 3b 3d disp32 */
	sete	%al
	cmpl	$0x12345678, t_data_l(%rip)	/* 81 3d disp32 imm32 */
	jne	1f
	or	$2, %eax
1:	testb	$0x80, t_data_b(%rip)		/* f6 05 disp32 imm8 */
	jz	2f
	or	$4, %eax
2:	add	t_data_q(%rip), %rdi		/* 48 03 3d disp32 */
	shr	$56, %rdi
	shl	$8, %rdi
	or	%rdi, %rax
	addq	$1, t_counter_q(%rip)		/* 48 83 05 disp32 imm8 */
	ret
ENDF(t_rip_cmp)

/* u64 t_call_helper(u64 x): 3x + 1 */
FUNC(t_call_helper)
	lea	1(%rdi,%rdi,2), %rax
	ret
ENDF(t_call_helper)

/* u64 t_call(u64 x): t_call_helper(x) + 1 via CALL rel32 (e8) */
FUNC(t_call)
	call	t_call_helper
	add	$1, %rax
	ret
ENDF(t_call)

/* u64 t_call_helper2(u64 x): x ^ 0xff */
FUNC(t_call_helper2)
	mov	%rdi, %rax
	xor	$0xff, %rax
	ret
ENDF(t_call_helper2)

/* u64 t_call_indirect(u64 x): t_call_helper2(t_call_helper(x)) through
 * CALL *%rax (ff d0) and CALL *%r11 (41 ff d3, REX.B) */
FUNC(t_call_indirect)
	lea	t_call_helper(%rip), %rax
	call	*%rax
	mov	%rax, %rdi
	lea	t_call_helper2(%rip), %r11
	call	*%r11
	ret
ENDF(t_call_indirect)

/* u64 t_jmp(u64 x): x + 1 + 16, via JMP rel8 (eb), JMP rel32 (e9) and a
 * backward JMP rel8 */
FUNC(t_jmp)
	mov	%rdi, %rax
	jmp	1f				/* eb: forward short */
	add	$1000, %rax			/* skipped */
1:	{disp32} jmp 3f				/* e9: forward near */
	add	$2000, %rax			/* skipped */
2:	add	$16, %rax
	ret
3:	add	$1, %rax
	jmp	2b				/* eb: backward short */
ENDF(t_jmp)

/* u64 t_jcc(s64 a, s64 b): cmp b, a (flags of a - b) then all 16 Jcc, first
 * in short form (7x rel8) then in near form (0f 8x rel32).  A taken Jcc
 * skips an LEA (which does not touch flags), so bit n (short) and bit 16+n
 * (near) are set when condition n (O=0, NO, B, AE, E, NE, BE, A, S, NS,
 * P, NP, L, GE, LE, G=15) was NOT taken.  Both halves must agree. */
	.macro	JCC_SHORT cc, bit
	j\cc	9f
	lea	(1 << \bit)(%rax), %rax
9:
	.endm
	.macro	JCC_NEAR cc, bit
	{disp32} j\cc	9f
	lea	(1 << \bit)(%rdx), %rdx
9:
	.endm

FUNC(t_jcc)
	xor	%eax, %eax
	xor	%edx, %edx
	cmp	%rsi, %rdi
	JCC_SHORT	o, 0
	JCC_SHORT	no, 1
	JCC_SHORT	b, 2
	JCC_SHORT	ae, 3
	JCC_SHORT	e, 4
	JCC_SHORT	ne, 5
	JCC_SHORT	be, 6
	JCC_SHORT	a, 7
	JCC_SHORT	s, 8
	JCC_SHORT	ns, 9
	JCC_SHORT	p, 10
	JCC_SHORT	np, 11
	JCC_SHORT	l, 12
	JCC_SHORT	ge, 13
	JCC_SHORT	le, 14
	JCC_SHORT	g, 15
	JCC_NEAR	o, 0
	JCC_NEAR	no, 1
	JCC_NEAR	b, 2
	JCC_NEAR	ae, 3
	JCC_NEAR	e, 4
	JCC_NEAR	ne, 5
	JCC_NEAR	be, 6
	JCC_NEAR	a, 7
	JCC_NEAR	s, 8
	JCC_NEAR	ns, 9
	JCC_NEAR	p, 10
	JCC_NEAR	np, 11
	JCC_NEAR	l, 12
	JCC_NEAR	ge, 13
	JCC_NEAR	le, 14
	JCC_NEAR	g, 15
	shl	$16, %rdx
	or	%rdx, %rax
	ret
ENDF(t_jcc)

/* u64 t_loop(u64 n): 3n via JRCXZ (e3) + LOOP (e2), then + 5 via LOOPNE
 * (e0, runs 5 times) and + 40 via LOOPE (e1, runs 4 times) */
FUNC(t_loop)
	xor	%eax, %eax
	mov	%rdi, %rcx
	jrcxz	2f
1:	add	$3, %rax
	loop	1b
2:	mov	$5, %ecx
3:	lea	1(%rax), %rax
	cmp	$-1, %rax			/* ZF = 0 */
	loopne	3b
	mov	$4, %ecx
4:	lea	10(%rax), %rax
	cmp	%rdx, %rdx			/* ZF = 1 */
	loope	4b
	ret
ENDF(t_loop)

/* u64 t_ret_imm(u64 on_stack): returns 2 * its stack argument with RET imm16
 * (c2 08 00), popping the argument */
FUNC(t_ret_imm)
	mov	8(%rsp), %rax
	shl	$1, %rax
	ret	$8
ENDF(t_ret_imm)

/* u64 t_ret(u64 x): 2x + 1: pushes x, calls t_ret_imm, plain RET (c3) */
FUNC(t_ret)
	push	%rdi
	call	t_ret_imm
	add	$1, %rax
	ret
ENDF(t_ret)

/* u64 t_rep_movsb(void *dst, const void *src, u64 n): REP MOVSB; returns
 * the number of bytes the string op advanced rdi */
FUNC(t_rep_movsb)
	mov	%rdx, %rcx
	mov	%rdi, %r8
	cld
	rep movsb
	mov	%rdi, %rax
	sub	%r8, %rax
	ret
ENDF(t_rep_movsb)

/* u64 t_rep_stosq(u64 *dst, u64 val, u64 n): REP STOSQ; returns rcx
 * afterwards (0) + the number of bytes rdi advanced */
FUNC(t_rep_stosq)
	mov	%rsi, %rax
	mov	%rdx, %rcx
	mov	%rdi, %r8
	cld
	rep stosq
	mov	%rdi, %rax
	sub	%r8, %rax
	add	%rcx, %rax
	ret
ENDF(t_rep_stosq)

/* u64 t_pushf_popf(u64 a, u64 b): cmp b, a; PUSHF (9c) and return the
 * arithmetic flags (CF PF AF ZF SF OF, mask 0x8d5); bit 16 = CF after
 * POPF (9d) of the flags with CF forced to 1; bit 17 = CF after POPF with CF
 * forced to 0 (expected 0).  IF/TF/DF are never changed. */
FUNC(t_pushf_popf)
	cmp	%rsi, %rdi
	pushfq
	pop	%rax
	and	$0x8d5, %eax
	pushfq
	orq	$1, (%rsp)
	popfq
	setc	%dl
	movzbl	%dl, %edx
	shl	$16, %edx
	or	%rdx, %rax
	pushfq
	andq	$-2, (%rsp)
	popfq
	setc	%dl
	movzbl	%dl, %edx
	shl	$17, %edx
	or	%rdx, %rax
	ret
ENDF(t_pushf_popf)

/* u64 t_plain(u64 a, u64 b): ordinary instructions, all boostable/steppable
 * (push/pop, imul, lea, stack load/store, xor, rol) */
FUNC(t_plain)
	push	%rbx
	sub	$16, %rsp
	mov	%rdi, %rbx
	imul	%rsi, %rbx
	lea	(%rbx,%rdi,2), %rax
	sub	%rsi, %rax
	mov	%rax, 8(%rsp)
	mov	8(%rsp), %rcx
	xor	%rbx, %rcx
	rol	$13, %rcx
	mov	%rcx, %rax
	add	$16, %rsp
	pop	%rbx
	ret
ENDF(t_plain)

/* u64 t_jmp_indirect(u64 i): JMP *%rax (ff e0) through a table in .rodata;
 * returns 100, 201, 302, 403 for i & 3 = 0..3 */
FUNC(t_jmp_indirect)
	and	$3, %edi
	lea	t_jmp_table(%rip), %rax
	mov	(%rax,%rdi,8), %rax
	jmp	*%rax
.Lj0:	mov	$100, %eax
	ret
.Lj1:	mov	$201, %eax
	ret
.Lj2:	mov	$302, %eax
	ret
.Lj3:	mov	$403, %eax
	ret
ENDF(t_jmp_indirect)

/* u64 t_endbr(u64 x): x + 3; starts with ENDBR64 (f3 0f 1e fa): a kprobe at
 * t_endbr+0 and t_endbr+4 both mean "function entry" (arch_adjust_kprobe_addr) */
FUNC(t_endbr)
	endbr64
	lea	3(%rdi), %rax
	ret
ENDF(t_endbr)

	.section .rodata
	.p2align 3
t_jmp_table:
	.quad	.Lj0, .Lj1, .Lj2, .Lj3
	.size	t_jmp_table, 32

	.data
	.p2align 3
	.globl	t_data_q, t_data_l, t_data_b, t_store_q, t_store_l, t_store_b, t_counter_q
t_data_q:
	.quad	0x1122334455667788
	.size	t_data_q, 8
t_data_l:
	.long	0x12345678
	.size	t_data_l, 4
t_data_b:
	.byte	0x81
	.size	t_data_b, 1
	.p2align 3
t_store_q:
	.quad	0
	.size	t_store_q, 8
t_store_l:
	.long	0
	.size	t_store_l, 4
t_store_b:
	.byte	0
	.size	t_store_b, 1
	.p2align 3
t_counter_q:
	.quad	0
	.size	t_counter_q, 8

	.section .note.GNU-stack, "", @progbits
