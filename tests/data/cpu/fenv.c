/* The floating-point environment a new process starts with, and results that depend on it:
 * compared between the emulator and native (x86-64) / qemu-user (arm64). */
#include <fenv.h>
#include <stdio.h>

static void control_words(void)
{
#if defined(__x86_64__)
	unsigned short fcw, fsw;
	unsigned int mxcsr;
	unsigned long flags;
	__asm__ volatile("fnstcw %0" : "=m"(fcw));
	__asm__ volatile("fnstsw %0" : "=m"(fsw));
	__asm__ volatile("stmxcsr %0" : "=m"(mxcsr));
	__asm__ volatile("pushfq; popq %0" : "=r"(flags));
	unsigned short cs, ss;
	__asm__ volatile("mov %%cs, %0" : "=r"(cs));
	__asm__ volatile("mov %%ss, %0" : "=r"(ss));
	/* the exception flags on their own line: Unicorn's x87/SSE does not accumulate them */
	printf("fcw=%#x mxcsr-control=%#x rflags&system=%#lx cpl=%d\n", fcw, mxcsr & ~0x3fu,
	       flags & 0x243700, cs & 3);
	printf("flags: fsw=%#x mxcsr=%#x\n", fsw, mxcsr & 0x3fu);
	(void)ss;
#elif defined(__aarch64__)
	unsigned long fpcr, fpsr;
	__asm__ volatile("mrs %0, fpcr" : "=r"(fpcr));
	__asm__ volatile("mrs %0, fpsr" : "=r"(fpsr));
	printf("fpcr=%#lx fpsr=%#lx\n", fpcr, fpsr);
#endif
}

static volatile double one = 1.0, three = 3.0, tiny = 1e-310;
static volatile long double lone = 1.0L, lthree = 3.0L;

static void results(const char *label)
{
	printf("%s: 1/3=%.17g 2/3=%.17g 1/3L=%.21Lg sqrt-ish=%.17g\n", label, one / three,
	       2 * one / three, lone / lthree, (one + tiny) * 1e300);
}

int main(void)
{
	control_words();
	printf("round=%s except=%#x\n", fegetround() == FE_TONEAREST ? "nearest" : "other",
	       fetestexcept(FE_ALL_EXCEPT));
	results("nearest");
	volatile double x = one / three;
	(void)x;
	printf("flags: inexact after 1/3=%d\n", fetestexcept(FE_INEXACT) != 0);
	feclearexcept(FE_ALL_EXCEPT);
	static const struct { int mode; const char *name; } modes[] = {
		{FE_UPWARD, "upward"}, {FE_DOWNWARD, "downward"}, {FE_TOWARDZERO, "towardzero"},
	};
	for (unsigned i = 0; i < sizeof modes / sizeof modes[0]; i++) {
		fesetround(modes[i].mode);
		results(modes[i].name);
	}
	fesetround(FE_TONEAREST);
	control_words();
	return 0;
}
