/* lz4_sweep.c - drive LZ4's block compressor over a generated text (no input needed):
 * compress at the default and an accelerated level, decompress, check the round trip,
 * print sizes and an FNV digest of the compressed bytes. Exit 0 when all round trips hold. */
#include <stdio.h>
#include <string.h>
#include "lz4.h"

#define N 8192

static char text[N], packed[LZ4_COMPRESSBOUND(N)], back[N];

static void make_text(void)
{
	static const char *words[] = {"probe", "kernel", "trap", "slot", "step", "cycle",
				      "return", "handler", "breakpoint", "ftrace"};
	unsigned s = 12345, i = 0;
	while (i < N) {
		s = s * 1103515245u + 12345u;
		const char *w = words[(s >> 16) % 10];
		for (size_t k = 0; w[k] && i < N; k++)
			text[i++] = w[k];
		if (i < N)
			text[i++] = (s >> 8) % 7 ? ' ' : '\n';
	}
}

static unsigned fnv(const char *p, int n)
{
	unsigned h = 2166136261u;
	while (n-- > 0)
		h = (h ^ (unsigned char)*p++) * 16777619u;
	return h;
}

int main(void)
{
	int bad = 0;
	make_text();
	for (int accel = 1; accel <= 8; accel *= 8) {
		int c = LZ4_compress_fast(text, packed, N, (int)sizeof(packed), accel);
		int d = LZ4_decompress_safe(packed, back, c, N);
		bad |= d != N || memcmp(text, back, N) != 0;
		printf("accel %d: %d -> %d bytes, digest %08x\n", accel, N, c, fnv(packed, c));
	}
	return bad;
}
