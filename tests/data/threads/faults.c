/* Synchronous signals for faults, caught by handlers that siglongjmp out: a read of an
   unmapped address (SIGSEGV, si_addr), a write to read-only memory, an undefined
   instruction (SIGILL), an integer division by zero where it traps (x86 SIGFPE), a
   breakpoint (SIGTRAP); then a fault with no handler still kills. */
#include <setjmp.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>

static sigjmp_buf env;
static volatile void *fault_addr;
static volatile int fault_code;

static void on_fault(int sig, siginfo_t *si, void *uc) {
    (void)uc;
    fault_addr = si->si_addr;
    fault_code = si->si_code;
    siglongjmp(env, sig);
}

static int try(void (*fn)(void)) {
    int sig = sigsetjmp(env, 1);
    if (sig == 0) {
        fn();
        return 0;
    }
    return sig;
}

static void read_unmapped(void) { (void)*(volatile int *)0x1230; }
static const int ro = 5;
static void write_rodata(void) { *(volatile int *)&ro = 6; }
static void undefined(void) {
#if defined(__x86_64__)
    __asm__ volatile("ud2");
#else
    __asm__ volatile(".inst 0x00000000");
#endif
}
static void breakpoint(void) {
#if defined(__x86_64__)
    __asm__ volatile("int3");
#else
    __asm__ volatile("brk #0x3e8");
#endif
}

int main(int argc, char **argv) {
    (void)argv;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_fault;
    sa.sa_flags = SA_SIGINFO;
    for (int s = 1; s < 32; s++)
        if (s != SIGKILL && s != SIGSTOP)
            sigaction(s, &sa, NULL);
    int sig = try(read_unmapped);
    printf("read_unmapped: sig=%d addr=%p code=%d\n", sig, (void *)fault_addr, fault_code);
    sig = try(write_rodata);
    printf("write_rodata: sig=%d addr_ok=%d code=%d\n", sig, fault_addr == &ro, fault_code);
    sig = try(undefined);
    printf("undefined: sig=%d\n", sig);
    sig = try(breakpoint);
    printf("breakpoint: sig=%d\n", sig);
    printf("again: sig=%d\n", try(read_unmapped));
    fflush(stdout);
    if (argc > 1) {
        signal(SIGSEGV, SIG_DFL);
        read_unmapped();
    }
    return 0;
}
