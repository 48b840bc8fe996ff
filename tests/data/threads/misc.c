/* The thread-related calls' answers on the one-CPU machine: affinity, tids, robust
   lists, sched_yield, fork refused, clone3 for a thread (raw, child exits at once). */
#define _GNU_SOURCE
#include <errno.h>
#include <linux/sched.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

static volatile int child_tid_word = -1;

int main(void) {
    cpu_set_t set;
    CPU_ZERO(&set);
    int rc = sched_getaffinity(0, sizeof set, &set);
    printf("affinity: rc=%d cpus=%d cpu0=%d\n", rc, CPU_COUNT(&set), CPU_ISSET(0, &set));
    printf("tid==pid: %d\n", (pid_t)syscall(SYS_gettid) == getpid());
    void *head;
    size_t len;
    rc = (int)syscall(SYS_get_robust_list, 0, &head, &len);
    printf("robust: rc=%d len=%zu set=%d\n", rc, len, head != NULL);
    printf("sched_yield: %d\n", sched_yield());
    pid_t pid = fork();
    printf("fork: %d %s\n", pid, pid < 0 ? strerror(errno) : "");
    /* clone3 with a thread's flags and a stack of its own; the child exits at once
       through a raw exit, the parent waits on the CHILD_CLEARTID word. */
    static char stack[1 << 16] __attribute__((aligned(16)));
    struct clone_args args;
    memset(&args, 0, sizeof args);
    args.flags = CLONE_VM | CLONE_FS | CLONE_FILES | CLONE_SIGHAND | CLONE_THREAD |
                 CLONE_SYSVSEM | CLONE_PARENT_SETTID | CLONE_CHILD_CLEARTID;
    args.parent_tid = (uintptr_t)&child_tid_word;
    args.child_tid = (uintptr_t)&child_tid_word;
    args.stack = (uintptr_t)stack;
    args.stack_size = sizeof stack;
    long r;
#if defined(__x86_64__)
    register long a0 __asm__("rdi") = (long)&args;
    register long a1 __asm__("rsi") = sizeof args;
    __asm__ volatile("syscall\n\t"
                     "test %%rax, %%rax\n\t"
                     "jnz 1f\n\t"
                     "mov $60, %%eax\n\t"
                     "xor %%edi, %%edi\n\t"
                     "syscall\n"
                     "1:"
                     : "=a"(r) : "0"(435L), "r"(a0), "r"(a1) : "rcx", "r11", "memory");
#else
    register long x0 __asm__("x0") = (long)&args;
    register long x1 __asm__("x1") = sizeof args;
    register long x8 __asm__("x8") = 435;
    __asm__ volatile("svc #0\n\t"
                     "cbnz x0, 1f\n\t"
                     "mov x8, #93\n\t"
                     "mov x0, #0\n\t"
                     "svc #0\n"
                     "1:"
                     : "+r"(x0) : "r"(x1), "r"(x8) : "memory");
    r = x0;
#endif
    int set_ok = r > 0 && child_tid_word == r;
    while (r > 0 && child_tid_word != 0)
        syscall(SYS_futex, &child_tid_word, 0 /* FUTEX_WAIT */, (int)r, NULL, NULL, 0);
    printf("clone3: new_tid=%d parent_settid=%d cleared=%d\n", r > getpid(), set_ok,
           child_tid_word == 0);
    return 0;
}
