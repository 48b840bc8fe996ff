/* malloc_sort.c - malloc/realloc/qsort/free exercise for the heap
 * (brk for small blocks, mmap for blocks above the 128 KiB threshold). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static unsigned long long lcg_state = 12345;

static unsigned lcg(void)
{
	lcg_state = lcg_state * 6364136223846793005ULL + 1442695040888963407ULL;
	return (unsigned)(lcg_state >> 33);
}

static int cmp_u32(const void *a, const void *b)
{
	unsigned x = *(const unsigned *)a, y = *(const unsigned *)b;

	return x < y ? -1 : x > y;
}

static int cmp_str(const void *a, const void *b)
{
	return strcmp(*(char *const *)a, *(char *const *)b);
}

static unsigned long long checksum(const unsigned *v, size_t n)
{
	unsigned long long s = 0;
	size_t i;

	for (i = 0; i < n; i++)
		s = s * 31 + v[i];
	return s;
}

static int sorted(const unsigned *v, size_t n)
{
	size_t i;

	for (i = 1; i < n; i++)
		if (v[i - 1] > v[i])
			return 0;
	return 1;
}

int main(void)
{
	enum { SMALL = 1000, BIG = 300000, NSTR = 500 };
	unsigned *small, *big, *grow = NULL;
	char **strs;
	size_t i, cap = 0;

	/* small array: brk heap */
	small = malloc(SMALL * sizeof(*small));
	if (!small)
		return 1;
	for (i = 0; i < SMALL; i++)
		small[i] = lcg() % 100000;
	qsort(small, SMALL, sizeof(*small), cmp_u32);
	printf("small: n=%d sorted=%d min=%u max=%u median=%u sum=%016llx\n", SMALL,
	       sorted(small, SMALL), small[0], small[SMALL - 1], small[SMALL / 2],
	       checksum(small, SMALL));

	/* big array (1.2 MB): mmap'ed by malloc */
	big = malloc(BIG * sizeof(*big));
	if (!big)
		return 1;
	for (i = 0; i < BIG; i++)
		big[i] = lcg();
	qsort(big, BIG, sizeof(*big), cmp_u32);
	printf("big: n=%d sorted=%d min=%u max=%u median=%u sum=%016llx\n", BIG,
	       sorted(big, BIG), big[0], big[BIG - 1], big[BIG / 2], checksum(big, BIG));
	free(big);

	/* many small strings */
	strs = calloc(NSTR, sizeof(*strs));
	for (i = 0; i < NSTR; i++) {
		char tmp[32];
		int len = snprintf(tmp, sizeof(tmp), "key-%05u-%zu", lcg() % 50000, i);

		strs[i] = malloc((size_t)len + 1);
		memcpy(strs[i], tmp, (size_t)len + 1);
	}
	qsort(strs, NSTR, sizeof(*strs), cmp_str);
	printf("strings: n=%d first=%s second=%s last=%s\n", NSTR, strs[0], strs[1],
	       strs[NSTR - 1]);
	for (i = 0; i < NSTR; i++)
		free(strs[i]);
	free(strs);

	/* realloc growth */
	for (i = 0; i < 20000; i++) {
		if (i == cap) {
			cap = cap ? cap * 2 : 4;
			grow = realloc(grow, cap * sizeof(*grow));
			if (!grow)
				return 1;
		}
		grow[i] = (unsigned)(i * i);
	}
	printf("realloc: n=20000 cap=%zu last=%u sum=%016llx\n", cap, grow[19999],
	       checksum(grow, 20000));
	free(grow);
	free(small);
	puts("malloc_sort: ok");
	return 0;
}
