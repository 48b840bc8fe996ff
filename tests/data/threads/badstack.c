/* A signal arrives while the stack pointer points at unmapped memory: no room for the
   frame, so the process dies of SIGSEGV (Linux's force_sigsegv). */
#include <signal.h>
#include <stdio.h>
#include <unistd.h>

static void handler(int s) { (void)s; }

int main(void) {
    signal(SIGUSR1, handler);
    long pid = getpid();
#if defined(__x86_64__)
    __asm__ volatile("mov %%rsp, %%r12\n\tmov $0x10, %%rsp\n\tmov $62, %%eax\n\t"
                     "mov %0, %%rdi\n\tmov $10, %%esi\n\tsyscall\n\tmov %%r12, %%rsp"
                     :: "r"(pid) : "rax", "rdi", "rsi", "r12", "rcx", "r11", "memory");
#else
    __asm__ volatile("mov x12, sp\n\tmov x9, #0x10\n\tmov sp, x9\n\tmov x8, #129\n\t"
                     "mov x0, %0\n\tmov x1, #10\n\tsvc #0\n\tmov sp, x12"
                     :: "r"(pid) : "x0", "x1", "x8", "x9", "x12", "memory");
#endif
    puts("not reached");
    return 0;
}
