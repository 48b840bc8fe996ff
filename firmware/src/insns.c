/*
 * insns.c - calls the per-arch special-instruction functions of
 * arch/<arch>/insns.S with fixed inputs and prints every result, one line
 * per call: "name(args) = 0x<result>".  Address-dependent results are
 * printed as ok/BAD so the output is the same at any load address.
 */
#include "platform.h"

static void show1(const char *name, u64 a, u64 r)
{
	putstr(name);
	putch('(');
	puthex(a);
	putstr(") = ");
	puthex(r);
	putnl();
}

static void show2(const char *name, u64 a, u64 b, u64 r)
{
	putstr(name);
	putch('(');
	puthex(a);
	putstr(", ");
	puthex(b);
	putstr(") = ");
	puthex(r);
	putnl();
}

static void show_ok(const char *name, int ok)
{
	putstr(name);
	putstr(ok ? ": ok" : ": BAD");
	putnl();
}

#if defined(__aarch64__)
u64 t_adr(u64 x);
u64 t_adrp(u64 x);
u64 t_ldr_lit(u64 x);
u64 t_ldr_lit_w(u64 x);
u64 t_ldrsw_lit(u64 x);
u64 t_bcond(u64 a, u64 b);
u64 t_cbz(u64 x);
u64 t_cbnz(u64 x);
u64 t_tbz(u64 x);
u64 t_tbnz(u64 x);
u64 t_bl(u64 x);
u64 t_br(u64 x);
u64 t_blr(u64 x);
u64 t_ret(u64 x, u64 y);
u64 t_plain(u64 a, u64 b);
u64 t_ldxr_stxr(u64 *p, u64 v);
u64 t_nop_hint(u64 x);
extern u64 t_adrp_store;
extern u64 t_atomic_q;

static const u64 bcond_pairs[][2] = {
	{ 1, 1 },
	{ 1, 2 },
	{ 2, 1 },
	{ (u64)-1, 1 },
	{ 0x8000000000000000ULL, 1 },
	{ 0x7fffffffffffffffULL, (u64)-1 },
};

static const u64 bit_inputs[] = {
	0, 1, 0x100000000ULL, 0x200000000ULL, 0x80000000ULL,
	0x8000000000000001ULL, (u64)-1,
};

int insns_main(void)
{
	unsigned i;
	u64 r;

	show1("t_adr", 1, t_adr(1));
	r = t_adrp(0x10);
	show1("t_adrp", 0x10, r);
	show_ok("t_adrp_store", t_adrp_store == r);
	show1("t_ldr_lit", 1, t_ldr_lit(1));
	show1("t_ldr_lit_w", 1, t_ldr_lit_w(1));
	show1("t_ldrsw_lit", 0x100000000ULL, t_ldrsw_lit(0x100000000ULL));
	for (i = 0; i < ARRAY_SIZE(bcond_pairs); i++)
		show2("t_bcond", bcond_pairs[i][0], bcond_pairs[i][1],
		      t_bcond(bcond_pairs[i][0], bcond_pairs[i][1]));
	for (i = 0; i < ARRAY_SIZE(bit_inputs); i++) {
		show1("t_cbz", bit_inputs[i], t_cbz(bit_inputs[i]));
		show1("t_cbnz", bit_inputs[i], t_cbnz(bit_inputs[i]));
		show1("t_tbz", bit_inputs[i], t_tbz(bit_inputs[i]));
		show1("t_tbnz", bit_inputs[i], t_tbnz(bit_inputs[i]));
	}
	show1("t_bl", 5, t_bl(5));
	show1("t_br", 5, t_br(5));
	show1("t_blr", 5, t_blr(5));
	show2("t_ret", 5, 0, t_ret(5, 0));
	show2("t_ret", 5, 1, t_ret(5, 1));
	show2("t_plain", 6, 7, t_plain(6, 7));
	for (i = 0; i < 3; i++) {
		r = t_ldxr_stxr(&t_atomic_q, 2);
		show2("t_ldxr_stxr", 40 + 2 * i, 2, r);
	}
	show_ok("t_atomic_q", t_atomic_q == 46);
	show1("t_nop_hint", 41, t_nop_hint(41));
	return 0;
}

#elif defined(__x86_64__)
u64 t_rip_load(u64 x);
u64 t_rip_store(u64 x);
u64 t_rip_lea(void);
u64 t_rip_cmp(u64 x);
u64 t_call(u64 x);
u64 t_call_helper(u64 x);
u64 t_call_indirect(u64 x);
u64 t_jmp(u64 x);
u64 t_jcc(u64 a, u64 b);
u64 t_loop(u64 n);
u64 t_ret(u64 x);
u64 t_rep_movsb(void *dst, const void *src, u64 n);
u64 t_rep_stosq(u64 *dst, u64 val, u64 n);
u64 t_pushf_popf(u64 a, u64 b);
u64 t_plain(u64 a, u64 b);
u64 t_jmp_indirect(u64 i);
u64 t_endbr(u64 x);
extern u64 t_data_q, t_store_q, t_counter_q;
extern u32 t_store_l;
extern u8 t_store_b;

static const u64 jcc_pairs[][2] = {
	{ 1, 1 },
	{ 1, 2 },
	{ 2, 1 },
	{ (u64)-1, 1 },
	{ 0x8000000000000000ULL, 1 },
	{ 0x7fffffffffffffffULL, (u64)-1 },
	{ 3, 0 },
};

int insns_main(void)
{
	static const char msg[] = "kprobes: rep movsb copies this";
	static char buf[40];
	static u64 qbuf[6];
	unsigned i;
	u64 r;

	show1("t_rip_load", 1, t_rip_load(1));
	r = t_rip_store(0x21);
	show1("t_rip_store", 0x21, r);
	show_ok("t_rip_store_mem", t_store_q == 0x42 && t_store_l == 0x5a5a5a5a &&
				   t_store_b == 0x77);
	show_ok("t_rip_lea", t_rip_lea() == (u64)(uintptr_t)&t_data_q);
	show1("t_rip_cmp", 0x1122334455667788ULL, t_rip_cmp(0x1122334455667788ULL));
	show1("t_rip_cmp", 5, t_rip_cmp(5));
	show_ok("t_counter_q", t_counter_q == 2);
	show1("t_call", 5, t_call(5));
	show1("t_call_indirect", 5, t_call_indirect(5));
	show1("t_jmp", 5, t_jmp(5));
	for (i = 0; i < ARRAY_SIZE(jcc_pairs); i++)
		show2("t_jcc", jcc_pairs[i][0], jcc_pairs[i][1],
		      t_jcc(jcc_pairs[i][0], jcc_pairs[i][1]));
	show1("t_loop", 0, t_loop(0));
	show1("t_loop", 7, t_loop(7));
	show1("t_ret", 5, t_ret(5));
	r = t_rep_movsb(buf, msg, sizeof(msg));
	show1("t_rep_movsb", sizeof(msg), r);
	putstr("t_rep_movsb buf: ");
	putstr(buf);
	putnl();
	r = t_rep_stosq(qbuf + 1, 0xa5a5a5a5a5a5a5a5ULL, 4);
	show1("t_rep_stosq", 4, r);
	show_ok("t_rep_stosq_mem", qbuf[0] == 0 && qbuf[1] == 0xa5a5a5a5a5a5a5a5ULL &&
				   qbuf[4] == qbuf[1] && qbuf[5] == 0);
	for (i = 0; i < ARRAY_SIZE(jcc_pairs); i++)
		show2("t_pushf_popf", jcc_pairs[i][0], jcc_pairs[i][1],
		      t_pushf_popf(jcc_pairs[i][0], jcc_pairs[i][1]));
	show2("t_plain", 6, 7, t_plain(6, 7));
	for (i = 0; i < 5; i++)
		show1("t_jmp_indirect", i, t_jmp_indirect(i));
	show1("t_endbr", 5, t_endbr(5));
	return 0;
}
#else
#error unsupported architecture
#endif

#ifndef IN_DEMO
int main(int argc, char **argv)
{
	(void)argc;
	(void)argv;
	return insns_main();
}
#endif
