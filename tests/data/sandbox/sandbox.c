/* Hostile guest for tests/test_sandbox_*.py: one subcommand per attack. */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#ifdef __x86_64__
#define TASK_SIZE 0x7ffffffff000UL          /* TASK_SIZE_MAX: 2^47 - 4096 */
#else
#define TASK_SIZE (1UL << 47)               /* the emulator's arm64 user space */
#endif
#define PG 4096UL

static long sys(long nr, long a, long b, long c, long d, long e, long f)
{
    long r = syscall(nr, a, b, c, d, e, f);
    return r < 0 ? -errno : r;
}

static void report(const char *what, long r)
{
    printf("%s %s\n", what, r < 0 ? strerrorname_np(-r) : (r ? "ok" : "0"));
}

/* mmap/munmap/mprotect/mremap and a syscall buffer at and around the top of user space. */
static int tasksize(void)
{
    long fixed = MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED;
    report("fixed-top", sys(SYS_mmap, TASK_SIZE, PG, PROT_READ, fixed, -1, 0));
    report("fixed-straddle", sys(SYS_mmap, TASK_SIZE - PG, 2 * PG, PROT_READ, fixed, -1, 0));
    report("noreplace-top", sys(SYS_mmap, TASK_SIZE, PG, PROT_READ,
                                MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0));
    report("fixed-below", sys(SYS_mmap, TASK_SIZE - 16 * PG, PG, PROT_READ, fixed, -1, 0)
           == (long)(TASK_SIZE - 16 * PG));
    report("hint-top", sys(SYS_mmap, TASK_SIZE, PG, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
           < (long)TASK_SIZE);
    report("munmap-top", sys(SYS_munmap, TASK_SIZE, PG, 0, 0, 0, 0));
    report("mprotect-top", sys(SYS_mprotect, TASK_SIZE, PG, PROT_READ | PROT_WRITE, 0, 0, 0));
    report("mremap-top", sys(SYS_mremap, TASK_SIZE, PG, 2 * PG, MREMAP_MAYMOVE, 0, 0));
    report("write-top", sys(SYS_write, 1, TASK_SIZE, 16, 0, 0, 0));
    report("read-top", sys(SYS_read, 0, TASK_SIZE, 16, 0, 0, 0));
    return 0;
}

/* Touch the page at TASK_SIZE itself: Linux maps nothing there (SIGSEGV). */
static int touchtop(void)
{
    fflush(stdout);
    return *(volatile unsigned char *)TASK_SIZE;
}

/* n one-page anonymous mmaps with alternating protections (no two can merge); the
   writable ones keep what was written (checked after all are mapped). */
static int mmaps(long n)
{
    char **pages = calloc(n, sizeof *pages);
    for (long i = 0; i < n; i++) {
        pages[i] = mmap(0, PG, i & 1 ? PROT_READ : PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (pages[i] == MAP_FAILED) { printf("mmap %ld failed: %s\n", i, strerror(errno)); return 1; }
        if (!(i & 1)) pages[i][0] = (char)(i | 1);
    }
    for (long i = 0; i < n; i++)
        if (pages[i][0] != (i & 1 ? 0 : (char)(i | 1))) { printf("page %ld lost\n", i); return 1; }
    printf("mapped %ld\n", n);
    return 0;
}

#ifdef __x86_64__
/* cli at CPL3: #GP, SIGSEGV under Linux, probed or not. */
__attribute__((noinline)) void do_cli(void) { __asm__ volatile("cli"); }
__attribute__((noinline)) void do_sti(void) { __asm__ volatile("sti"); }
/* popf at CPL3 cannot raise IOPL, nor (with IOPL 0) change IF. */
__attribute__((noinline)) void do_popf(unsigned long f)
{
    __asm__ volatile("push %0; popf" :: "r"(f) : "cc", "memory");
}

static int popf(void)
{
    unsigned long f;
    __asm__ volatile("pushf; pop %0" : "=r"(f));
    do_popf((f | 0x3000) & ~0x200UL);
    __asm__ volatile("pushf; pop %0" : "=r"(f));
    printf("iopl=%lu if=%lu\n", (f >> 12) & 3, (f >> 9) & 1);
    return 0;
}
#else
static int popf(void) { puts("no popf"); return 0; }
__attribute__((noinline)) void do_cli(void) { __asm__ volatile("msr daifset, #2"); }
__attribute__((noinline)) void do_sti(void) { __asm__ volatile("msr daifclr, #2"); }
#endif

/* x86: a data segment load reads the GDT (which lives above TASK_SIZE) and must work. */
static int segload(void)
{
#ifdef __x86_64__
    __asm__ volatile("mov $0x2b, %%eax; mov %%eax, %%ds; mov %%eax, %%es" ::: "eax");
#endif
    puts("segload ok");
    return 0;
}

int main(int argc, char **argv)
{
    const char *cmd = argc > 1 ? argv[1] : "";
    setvbuf(stdout, 0, _IONBF, 0);
    if (!strcmp(cmd, "tasksize")) return tasksize();
    if (!strcmp(cmd, "touchtop")) return touchtop();
    if (!strcmp(cmd, "segload")) return segload();
    if (!strcmp(cmd, "popf")) return popf();
    if (!strcmp(cmd, "mmaps")) return mmaps(argc > 2 ? atol(argv[2]) : 1000);
    if (!strcmp(cmd, "cli")) { puts("before"); do_cli(); puts("after"); return 0; }
    if (!strcmp(cmd, "sti")) { puts("before"); do_sti(); puts("after"); return 0; }
    fprintf(stderr, "usage: sandbox tasksize|touchtop|segload|mmaps N|cli|sti|popf\n");
    return 2;
}
