/* malloc-heavy: many small and large blocks (brk and mmap), realloc growth, frees in a
 * scrambled order, qsort, and a checksum of everything. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static unsigned long rng = 12345;
static unsigned long next(void) { rng = rng * 6364136223846793005UL + 1442695040888963407UL; return rng >> 33; }

static int cmp(const void *a, const void *b)
{
    unsigned long x = *(const unsigned long *)a, y = *(const unsigned long *)b;
    return x < y ? -1 : x > y;
}

int main(void)
{
    enum { N = 6000, M = 30000 };
    char **blocks = calloc(N, sizeof *blocks);
    unsigned long sum = 0;
    for (int round = 0; round < 2; round++) {
        for (int i = 0; i < N; i++) {
            size_t sz = 1 + next() % (i % 100 == 0 ? 200000 : 300);
            blocks[i] = realloc(blocks[i], sz);
            memset(blocks[i], (int)(i + round), sz);
            sum += (unsigned char)blocks[i][sz - 1] + sz;
        }
        for (int i = 0; i < N; i += 1 + (int)(next() % 3)) {
            free(blocks[i]);
            blocks[i] = NULL;
        }
    }
    unsigned long *arr = malloc(M * sizeof *arr);
    for (int i = 0; i < M; i++) arr[i] = next();
    qsort(arr, M, sizeof *arr, cmp);
    for (int i = 1; i < M; i++)
        if (arr[i - 1] > arr[i]) { puts("not sorted"); return 1; }
    printf("sum=%lu min=%lu max=%lu\n", sum, arr[0], arr[M - 1]);
    for (int i = 0; i < N; i++) free(blocks[i]);
    free(blocks);
    free(arr);
    return 0;
}
