/* A W^X JIT: each round writes `return n * round + k` into an rw page, makes it r-x,
 * calls it, makes it rw again, and the next round rewrites it. Output: one line a round.
 * The emulator must run the code as rewritten each time (its TLB and translated code
 * follow every mprotect). */
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>

typedef long (*fn_t)(long);

static size_t emit(uint8_t *p, int32_t k)
{
#if defined(__x86_64__)
    /* lea rax, [rdi + k]; ret */
    p[0] = 0x48; p[1] = 0x8d; p[2] = 0x87;
    memcpy(p + 3, &k, 4);
    p[7] = 0xc3;
    return 8;
#else
    /* movz x1, #k; add x0, x0, x1; ret */
    uint32_t w[3] = {0xd2800001u | ((uint32_t)(k & 0xffff) << 5), 0x8b010000u, 0xd65f03c0u};
    memcpy(p, w, sizeof w);
    return sizeof w;
#endif
}

int main(void)
{
    uint8_t *page = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (page == MAP_FAILED)
        return 1;
    long total = 0;
    for (int round = 0; round < 40; round++) {
        size_t n = emit(page + 64 * (round % 4), 1000 + 7 * round);
        __builtin___clear_cache((char *)page, (char *)page + 64 * 4 + n);
        if (mprotect(page, 4096, PROT_READ | PROT_EXEC))
            return 2;
        long got = ((fn_t)(page + 64 * (round % 4)))(round);
        total += got;
        printf("round %d: %ld\n", round, got);
        if (mprotect(page, 4096, PROT_READ | PROT_WRITE))
            return 3;
    }
    printf("total %ld\n", total);
    return 0;
}
