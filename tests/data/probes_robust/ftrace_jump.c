/* A hostile guest against the ftrace trampoline: it reads its own patched ftrace site
   (x86 `call tramp`, arm64 `b stub`), and jumps to the trampoline itself with the stack
   pointer on an unmapped page. Without a patched site it prints a line and exits 3. */
#include <stdint.h>
#include <stdio.h>

volatile int sink;

__attribute__((noinline)) void leaf(int v) { sink = v; }

__attribute__((noinline)) int traced(int v)
{
    leaf(v);
    return v + 1;
}

__attribute__((no_instrument_function)) int main(void)
{
    const uint8_t *p = (const uint8_t *)traced;
    uintptr_t target = 0;
#if defined(__x86_64__)
    if (p[0] == 0xe8)
        target = (uintptr_t)p + 5 + *(const int32_t *)(p + 1);
    if (target)
        __asm__ volatile("mov $0x10000, %%rsp; jmp *%0" :: "r"(target) : "memory");
#else
    uint32_t w = *(const uint32_t *)p;
    if ((w & 0xFC000000u) == 0x14000000u)
        target = (uintptr_t)p + (uintptr_t)((int64_t)((int32_t)(w << 6) >> 6) * 4);
    if (target)
        __asm__ volatile("mov x9, #0x10000; mov sp, x9; br %0" :: "r"(target) : "x9", "memory");
#endif
    printf("site not patched: %d\n", traced(1));
    return 3;
}
