/* Maps 1 GiB it barely touches, then calls a tiny function: the sweep must not copy the
 * untouched gigabyte for every run. */
#include <stdio.h>
#include <sys/mman.h>

__attribute__((noinline)) int tick(int x) { return x + 1; }

int main(void) {
    char *p = mmap(0, 1UL << 30, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) { puts("map failed"); return 1; }
    p[12345] = 7;
    p[(1UL << 30) - 1] = 9;
    printf("%d\n", tick(p[12345]));
    return 0;
}
