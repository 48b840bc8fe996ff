/*
 * insns.S (arm64) - one small function per instruction class that arm64
 * kprobes must simulate, step out of line, or reject
 * (arch/arm64/kernel/probes/decode-insn.c).  Written in assembly so the
 * compiler cannot remove or change them.  Called from insns.c.
 *
 * Conventions: AAPCS64, x0.. arguments, result in x0.  Literal data is placed
 * inside the functions (after the ret) or in .rodata/.data below so the
 * results are checkable.  Every function has a .size so symbol+offset works.
 */
	.text

#define FUNC(name)		\
	.globl	name;		\
	.type	name, %function;\
	.p2align 3;		\
name:

#define ENDF(name)	.size name, . - name

/* u64 t_adr(u64 x): x + the literal addressed with ADR (simulated) */
FUNC(t_adr)
	adr	x1, 1f			/* ADR forward */
	ldr	x1, [x1]
	adr	x2, t_adr		/* ADR backward (to the symbol itself) */
	ldr	w2, [x2]		/* first insn word of t_adr: the ADR */
	lsr	w2, w2, #24		/* its top byte: 0x10 */
	add	x0, x0, x1
	add	x0, x0, x2
	ret
	.p2align 3
1:	.quad	0x1122334455667788
ENDF(t_adr)

/* u64 t_adrp(u64 x): x + t_rodata_q (via ADRP+ADD); also stores the result
 * to t_adrp_store in .data (ADRP + STR :lo12:, another page) */
FUNC(t_adrp)
	adrp	x1, t_rodata_q
	add	x1, x1, :lo12:t_rodata_q
	ldr	x1, [x1]
	add	x0, x0, x1
	adrp	x2, t_adrp_store
	str	x0, [x2, :lo12:t_adrp_store]
	ret
ENDF(t_adrp)

/* u64 t_ldr_lit(u64 x): x + 64-bit literal (LDR Xt, label); also contains
 * a PRFM (literal), which kprobes rejects */
FUNC(t_ldr_lit)
	prfm	pldl1keep, 1f
	ldr	x1, 1f
	add	x0, x0, x1
	ret
	.p2align 3
1:	.quad	0x0123456789abcdef
ENDF(t_ldr_lit)

/* literal placed *before* t_ldr_lit_w: negative imm19 */
	.p2align 3
	.type	t_ldr_lit_w_data, %object
	.size	t_ldr_lit_w_data, 8
t_ldr_lit_w_data:
	.word	0xdeadbeef
	.word	0

/* u64 t_ldr_lit_w(u64 x): x + zero-extended 32-bit literal (LDR Wt, label);
 * x1 is pre-set to all ones to show the upper half is cleared */
FUNC(t_ldr_lit_w)
	mov	x1, #-1
	ldr	w1, t_ldr_lit_w_data
	add	x0, x0, x1
	ret
ENDF(t_ldr_lit_w)

/* u64 t_ldrsw_lit(u64 x): x + sign-extended 32-bit literal (LDRSW) */
FUNC(t_ldrsw_lit)
	ldrsw	x1, 1f
	add	x0, x0, x1
	ret
	.p2align 2
1:	.word	0x80000001
ENDF(t_ldrsw_lit)

/* u64 t_bcond(s64 a, s64 b): cmp a, b, then one B.cond per condition code;
 * a taken branch skips the ORR, so bit n of the result is set when
 * condition n (EQ=0 ... LE=13, AL=14, NV=15) was NOT taken. */
	.macro	BC cond, bit
	b.\cond	9f
	orr	x2, x2, #(1 << \bit)
9:
	.endm

FUNC(t_bcond)
	mov	x2, #0
	cmp	x0, x1
	BC	eq, 0
	BC	ne, 1
	BC	hs, 2
	BC	lo, 3
	BC	mi, 4
	BC	pl, 5
	BC	vs, 6
	BC	vc, 7
	BC	hi, 8
	BC	ls, 9
	BC	ge, 10
	BC	lt, 11
	BC	gt, 12
	BC	le, 13
	BC	al, 14
	BC	nv, 15
	mov	x0, x2
	ret
ENDF(t_bcond)

/* u64 t_cbz(u64 x): bit0 = CBZ Xn not taken, bit1 = CBZ Wn not taken;
 * bits 8.. = iterations of a backward CBZ loop */
FUNC(t_cbz)
	mov	x2, #0
	cbz	x0, 1f
	orr	x2, x2, #1
1:	cbz	w0, 2f
	orr	x2, x2, #2
2:	mov	x3, #3			/* counts 3, 2, 1 */
3:	add	x2, x2, #0x100
	sub	x3, x3, #1
	cbz	x3, 4f
	b	3b
4:	mov	x0, x2
	ret
ENDF(t_cbz)

/* u64 t_cbnz(u64 x): bit0 = CBNZ Xn not taken, bit1 = CBNZ Wn not taken;
 * bits 8.. = iterations of a backward CBNZ loop (x & 7, at least 1) */
FUNC(t_cbnz)
	mov	x2, #0
	cbnz	x0, 1f
	orr	x2, x2, #1
1:	cbnz	w0, 2f
	orr	x2, x2, #2
2:	and	x3, x0, #7
3:	add	x2, x2, #0x100
	subs	x3, x3, #1
	b.mi	4f
	cbnz	x3, 3b
4:	mov	x0, x2
	ret
ENDF(t_cbnz)

/* u64 t_tbz(u64 x): TBZ on bit 0, 33 (b5 set), W bit 31, bit 63;
 * result bit n set = that TBZ was NOT taken (the tested bit was 1) */
FUNC(t_tbz)
	mov	x2, #0
	tbz	x0, #0, 1f
	orr	x2, x2, #1
1:	tbz	x0, #33, 2f
	orr	x2, x2, #2
2:	tbz	w0, #31, 3f
	orr	x2, x2, #4
3:	tbz	x0, #63, 4f
	orr	x2, x2, #8
4:	mov	x0, x2
	ret
ENDF(t_tbz)

/* u64 t_tbnz(u64 x): TBNZ on bits 0, 33, W31, 63; result bit n set = that
 * TBNZ was NOT taken (the tested bit was 0).  Bit 4 from a backward TBNZ. */
FUNC(t_tbnz)
	mov	x2, #0
	tbnz	x0, #0, 1f
	orr	x2, x2, #1
1:	tbnz	x0, #33, 2f
	orr	x2, x2, #2
2:	tbnz	w0, #31, 3f
	orr	x2, x2, #4
3:	tbnz	x0, #63, 4f
	orr	x2, x2, #8
4:	mov	x3, #0
5:	tbnz	x3, #1, 6f		/* forward exit once x3 reaches 2 */
	add	x3, x3, #1
	tbnz	x3, #0, 5b		/* backward TBNZ (x3 = 1) */
	orr	x2, x2, #0x10
	b	5b
6:	mov	x0, x2
	ret
ENDF(t_tbnz)

/* helper before t_bl (backward BL target) */
FUNC(t_bl_back)
	add	x0, x0, #7
	ret
ENDF(t_bl_back)

/* u64 t_bl(u64 x): ((x + 7) * 2) + 1 via a backward BL and a forward BL */
FUNC(t_bl)
	stp	x29, x30, [sp, #-16]!
	mov	x29, sp
	bl	t_bl_back
	bl	t_bl_fwd
	add	x0, x0, #1
	ldp	x29, x30, [sp], #16
	ret
ENDF(t_bl)

/* helper after t_bl (forward BL target, also the BLR target) */
FUNC(t_bl_fwd)
	lsl	x0, x0, #1
	ret
ENDF(t_bl_fwd)

/* u64 t_br(u64 x): x + 5, reached through BR x16 */
FUNC(t_br)
	adr	x16, 1f
	br	x16
	mov	x0, #0xdead		/* skipped */
	ret
1:	add	x0, x0, #5
	ret
ENDF(t_br)

/* u64 t_blr(u64 x): x * 2 + 3 through BLR x9 (to t_bl_fwd) */
FUNC(t_blr)
	stp	x29, x30, [sp, #-16]!
	mov	x29, sp
	adrp	x9, t_bl_fwd
	add	x9, x9, :lo12:t_bl_fwd
	blr	x9
	add	x0, x0, #3
	ldp	x29, x30, [sp], #16
	ret
ENDF(t_blr)

/* u64 t_ret(u64 x, u64 y): y == 0: x + 1 returned with RET (x30);
 * y != 0: x + 2 returned with RET x2 (Rn != 30) */
FUNC(t_ret)
	cbnz	x1, 1f
	add	x0, x0, #1
	ret
1:	mov	x2, x30
	add	x0, x0, #2
	ret	x2
ENDF(t_ret)

/* u64 t_plain(u64 a, u64 b): ordinary ALU / load / store instructions,
 * all steppable out of line (incl. SP-relative STP/LDP with writeback) */
FUNC(t_plain)
	stp	x29, x30, [sp, #-32]!
	mov	x29, sp
	add	x2, x0, x1
	str	x2, [sp, #16]
	mul	x3, x0, x1
	ldr	x4, [sp, #16]
	eor	x0, x4, x3, lsl #3
	sub	x0, x0, #1
	ror	x0, x0, #13
	ldp	x29, x30, [sp], #32
	ret
ENDF(t_plain)

/* u64 t_ldxr_stxr(u64 *p, u64 v): atomic fetch-add with an LL/SC loop.
 * Probes on the ADD/STXR/CBNZ (inside the sequence) must be rejected; the
 * LDXR itself is rejected as an exclusive; the MOV after it is fine. */
FUNC(t_ldxr_stxr)
1:	ldxr	x2, [x0]
	add	x3, x2, x1
	stxr	w4, x3, [x0]
	cbnz	w4, 1b
	mov	x0, x2			/* returns the old value */
	ret
ENDF(t_ldxr_stxr)

/* u64 t_nop_hint(u64 x): x + 1 surrounded by hints.  BTI c, PACIASP,
 * AUTIASP, NOP are steppable hints; CSDB and HINT #0x7f are rejected. */
FUNC(t_nop_hint)
	hint	#34			/* bti c */
	hint	#25			/* paciasp */
	nop
	add	x0, x0, #1
	hint	#20			/* csdb */
	hint	#0x7f			/* unallocated hint: NOP */
	hint	#29			/* autiasp */
	ret
ENDF(t_nop_hint)

	.section .rodata
	.p2align 3
	.globl	t_rodata_q
t_rodata_q:
	.quad	0x0f0e0d0c0b0a0908
	.size	t_rodata_q, 8

	.data
	.p2align 3
	.globl	t_adrp_store
t_adrp_store:
	.quad	0
	.size	t_adrp_store, 8
	.globl	t_atomic_q
t_atomic_q:
	.quad	40
	.size	t_atomic_q, 8

	.section .note.GNU-stack, "", %progbits
