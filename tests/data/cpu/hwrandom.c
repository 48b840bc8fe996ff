/* Hardware random numbers (x86 RDRAND/RDSEED; arm64 RNDR where the CPU has FEAT_RNG). */
#include <stdio.h>
#include <sys/auxv.h>

int main(void)
{
#if defined(__x86_64__)
	for (int i = 0; i < 3; i++) {
		unsigned long r, s;
		unsigned char ok_r, ok_s;
		__asm__ volatile("rdrand %0; setc %1" : "=r"(r), "=qm"(ok_r));
		__asm__ volatile("rdseed %0; setc %1" : "=r"(s), "=qm"(ok_s));
		unsigned int r32;
		unsigned short r16;
		__asm__ volatile("rdrand %0" : "=r"(r32));
		__asm__ volatile("rdrand %0" : "=r"(r16));
		printf("rdrand=%016lx cf=%d rdseed=%016lx cf=%d r32=%08x r16=%04x\n", r, ok_r, s, ok_s,
		       r32, r16);
	}
#elif defined(__aarch64__)
	printf("hwcap2 rng=%d\n", (getauxval(AT_HWCAP2) >> 16) & 1);
	fflush(stdout);
	unsigned long r;
	__asm__ volatile("mrs %0, s3_3_c2_c4_0" : "=r"(r));      /* RNDR */
	printf("rndr=%016lx\n", r);
#endif
	return 0;
}
