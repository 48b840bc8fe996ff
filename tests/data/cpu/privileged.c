/* One instruction per case, named by argv[1]. The privileged ones must kill the process
 * as under Linux (SIGSEGV for x86 #GP, SIGILL for an arm64 EL0 undefined); the others
 * ("ok" cases) must let it go on and print "survived <case>". */
#include <stdio.h>
#include <string.h>

struct insn_case {
	const char *name;
	void (*run)(void);
};

#define CASE(n, text) static void n(void) { __asm__ volatile(text ::: "memory"); }

#if defined(__x86_64__)
CASE(cli, "cli")
CASE(sti, "sti")
CASE(hlt, "hlt")
CASE(in_port, "inb $0x80, %%al")
CASE(out_port, "outb %%al, $0x80")
CASE(out_dx, "movw $0x3f8, %%dx; outb %%al, %%dx")
CASE(rdmsr, "xorl %%ecx, %%ecx; rdmsr")
CASE(wrmsr, "xorl %%ecx, %%ecx; xorl %%eax, %%eax; xorl %%edx, %%edx; wrmsr")
CASE(read_cr0, "movq %%cr0, %%rax")
CASE(write_cr3, "xorl %%eax, %%eax; movq %%rax, %%cr3")
CASE(invlpg, "invlpg (%%rsp)")
CASE(lgdt, "subq $16, %%rsp; lgdt (%%rsp); addq $16, %%rsp")
CASE(wbinvd, "wbinvd")
CASE(swapgs, "swapgs")
CASE(mov_dr7, "movq %%dr7, %%rax")
CASE(rdtsc, "rdtsc")
CASE(pause, "pause")
CASE(tls_read, "movq %%fs:0, %%rax")
CASE(popf_if, "pushfq; andq $~0x200, (%%rsp); popfq")
static const struct insn_case cases[] = {
	{"cli", cli}, {"sti", sti}, {"hlt", hlt}, {"in", in_port}, {"out", out_port},
	{"out_dx", out_dx}, {"rdmsr", rdmsr}, {"wrmsr", wrmsr}, {"read_cr0", read_cr0},
	{"write_cr3", write_cr3}, {"invlpg", invlpg}, {"lgdt", lgdt}, {"wbinvd", wbinvd},
	{"swapgs", swapgs}, {"mov_dr7", mov_dr7},
	{"ok_rdtsc", rdtsc}, {"ok_pause", pause}, {"ok_tls_read", tls_read},
	{"ok_popf_if", popf_if},
};
#elif defined(__aarch64__)
CASE(daifset, "msr daifset, #2")
CASE(read_sctlr, "mrs x0, sctlr_el1")
CASE(write_vbar, "msr vbar_el1, xzr")
CASE(tlbi, "tlbi vmalle1")
CASE(eret, "eret")
CASE(hvc, "hvc #0")
CASE(smc, "smc #0")
CASE(ic_iallu, "ic iallu")
CASE(at_s1e1r, "mov x0, sp; at s1e1r, x0")
CASE(read_esr, "mrs x0, esr_el1")
CASE(hlt, "hlt #0")
CASE(wfi, "wfi")
CASE(wfe, "sevl; wfe")
CASE(yield, "yield")
CASE(cntvct, "mrs x0, cntvct_el0")
CASE(cntfrq, "mrs x0, cntfrq_el0")
CASE(tpidr, "mrs x0, tpidr_el0; msr tpidr_el0, x0")
CASE(ctr, "mrs x0, ctr_el0")
static unsigned char zva_buf[4096] __attribute__((aligned(2048)));
static void dc_zva(void) { __asm__ volatile("dc zva, %0" :: "r"(zva_buf + 2048) : "memory"); }
CASE(fp, "fmov d0, #1.0; fadd d0, d0, d0")
static const struct insn_case cases[] = {
	{"daifset", daifset}, {"read_sctlr", read_sctlr}, {"write_vbar", write_vbar},
	{"tlbi", tlbi}, {"eret", eret}, {"hvc", hvc}, {"smc", smc}, {"ic_iallu", ic_iallu},
	{"at_s1e1r", at_s1e1r}, {"read_esr", read_esr}, {"hlt", hlt},
	{"ok_wfi", wfi}, {"ok_wfe", wfe}, {"ok_yield", yield}, {"ok_cntvct", cntvct},
	{"ok_cntfrq", cntfrq}, {"ok_tpidr", tpidr}, {"ok_ctr", ctr}, {"ok_dc_zva", dc_zva},
	{"ok_fp", fp},
};
#endif

int main(int argc, char **argv)
{
	unsigned n = sizeof cases / sizeof cases[0];
	if (argc < 2) {
		for (unsigned i = 0; i < n; i++)
			printf("%s\n", cases[i].name);
		return 0;
	}
	for (unsigned i = 0; i < n; i++) {
		if (strcmp(argv[1], cases[i].name) == 0) {
			fflush(stdout);
			cases[i].run();
			printf("survived %s\n", argv[1]);
			return 0;
		}
	}
	return 2;
}
