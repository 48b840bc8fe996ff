/* checkpoint.c - state of every kind live across a call to checkpoint(): an open file
 * half read, a pipe holding data, heap (brk and mmap), getrandom, the clock, stdin half
 * read, FP state (a non-default rounding mode, a value in a callee-saved FP register).
 * argv: FILE [clock] — with "clock" the clock is read before the checkpoint too. */
#include <fcntl.h>
#include <fenv.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <time.h>
#include <unistd.h>

volatile int variant;

__attribute__((noinline)) void checkpoint(void)
{
	__asm__ volatile("" ::: "memory");
}

static unsigned fnv(const unsigned char *p, size_t n, unsigned h)
{
	while (n--)
		h = (h ^ *p++) * 16777619u;
	return h;
}

int main(int argc, char **argv)
{
	char buf[64], in[8];
	unsigned char rnd[16];
	struct timespec t0 = {0}, t1;
	int p[2], fd;
	ssize_t n;

	fd = open(argv[1], O_RDONLY);
	n = read(fd, buf, 5);
	if (pipe(p) || write(p[1], "pipe-data", 9) != 9)
		return 99;
	char *heap = malloc(100000);
	char *big = mmap(0, 1 << 20, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	memset(heap, 'h', 100000);
	memset(big, 'm', 4096);
	getrandom(rnd, 8, 0);
	if (argc > 2)
		clock_gettime(CLOCK_MONOTONIC, &t0);
	n += read(0, in, 3);
	fesetround(FE_UPWARD);
	double acc = 1.0;
	for (int i = 1; i < 1000; i++)
		acc = acc / 3.0 + (double)i / 7.0;
	checkpoint();
	acc += variant / 3.0;
	n += read(fd, buf + 5, sizeof(buf) - 5);
	n += read(p[0], buf, 4);
	getrandom(rnd + 8, 8, 0);
	clock_gettime(CLOCK_MONOTONIC, &t1);
	n += read(0, in + 3, 5);
	heap[variant] = 'v';
	char *more = malloc(300000);
	memset(more, 'x', 300000);
	printf("variant=%d n=%zd buf=%.4s acc=%.17g rnd=%08x heap=%08x big=%08x in=%.8s\n",
	       variant, n, buf, acc, fnv(rnd, 16, 2166136261u), fnv((void *)heap, 100000, 1),
	       fnv((void *)big, 4096, 1), in);
	printf("t0=%lld.%09ld t1=%lld.%09ld more=%p\n", (long long)t0.tv_sec, t0.tv_nsec,
	       (long long)t1.tv_sec, t1.tv_nsec, (void *)(more != 0));
	fprintf(stderr, "done %d\n", variant);
	return 3 + variant;
}
