/* The issue-19 task/signal checklist items no other program shows, one line each, the same
   natively, under qemu-user and in the emulator: set_tid_address, raw futex WAIT (EAGAIN,
   relative and absolute timeouts on the clock), WAKE, CMP_REQUEUE / REQUEUE, WAKE_OP, a
   POSIX timer aimed at one thread (SIGEV_THREAD_ID), SIGFPE from a division by zero where
   the CPU traps. Other modes: `robust` (a thread dies holding a robust mutex: the next
   locker gets EOWNERDEAD), `bus FILE` (touching a file mapping past EOF is SIGBUS),
   `vfork` (the emulator refuses new processes). */
#define _GNU_SOURCE
#include <errno.h>
#include <linux/futex.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <fcntl.h>
#include <unistd.h>

static long futex(uint32_t *uaddr, int op, uint32_t val, const void *timeout_or_val2,
                  uint32_t *uaddr2, uint32_t val3) {
    long r = syscall(SYS_futex, uaddr, op, val, timeout_or_val2, uaddr2, val3);
    return r < 0 ? -errno : r;
}

static long long now_ns(clockid_t clk) {
    struct timespec ts;
    clock_gettime(clk, &ts);
    return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void tid_address(void) {
    static int word;
    long r = syscall(SYS_set_tid_address, &word);
    printf("set_tid_address: returns_tid=%d\n", r == syscall(SYS_gettid));
}

static void futex_waits(void) {
    static uint32_t f;
    long eagain = futex(&f, FUTEX_WAIT_PRIVATE, 1, NULL, NULL, 0);
    struct timespec rel = {0, 20000000};
    long long t0 = now_ns(CLOCK_MONOTONIC);
    long timed = futex(&f, FUTEX_WAIT_PRIVATE, 0, &rel, NULL, 0);
    long long waited = now_ns(CLOCK_MONOTONIC) - t0;
    struct timespec abs;
    clock_gettime(CLOCK_MONOTONIC, &abs);
    abs.tv_nsec += 10000000;
    if (abs.tv_nsec >= 1000000000) { abs.tv_sec++; abs.tv_nsec -= 1000000000; }
    long absolute = futex(&f, FUTEX_WAIT_BITSET_PRIVATE, 0, &abs, NULL, FUTEX_BITSET_MATCH_ANY);
    int past = now_ns(CLOCK_MONOTONIC) >= abs.tv_sec * 1000000000LL + abs.tv_nsec;
    clock_gettime(CLOCK_REALTIME, &abs);
    abs.tv_nsec += 10000000;
    if (abs.tv_nsec >= 1000000000) { abs.tv_sec++; abs.tv_nsec -= 1000000000; }
    long real = futex(&f, FUTEX_WAIT_BITSET_PRIVATE | FUTEX_CLOCK_REALTIME, 0, &abs, NULL,
                      FUTEX_BITSET_MATCH_ANY);
    printf("futex_wait: eagain=%d timedout=%d waited>=20ms=%d abs=%d past=%d realtime=%d "
           "wake_none=%ld\n", eagain == -EAGAIN, timed == -ETIMEDOUT, waited >= 20000000,
           absolute == -ETIMEDOUT, past, real == -ETIMEDOUT, futex(&f, FUTEX_WAKE_PRIVATE, 1,
           NULL, NULL, 0));
}

/* CMP_REQUEUE: three waiters on f1 are moved to f2 (loop until all three arrived), woken
   one by one through f2 and, after a plain REQUEUE, f3. */
static uint32_t f1, f2, f3, f4, f5;
static atomic_int woken;

static void *waiter(void *arg) {
    uint32_t *where = arg;
    long r;
    do
        r = futex(where, FUTEX_WAIT_PRIVATE, 0, NULL, NULL, 0);
    while (r == -EINTR);
    atomic_fetch_add(&woken, 1);
    return (void *)r;
}

static void wait_woken(int n) {
    while (atomic_load(&woken) < n)
        sched_yield();
}

static void requeue(void) {
    pthread_t t[3];
    for (int i = 0; i < 3; i++)
        pthread_create(&t[i], NULL, waiter, &f1);
    long moved = 0;
    while (moved < 3) {
        long r = futex(&f1, FUTEX_CMP_REQUEUE_PRIVATE, 0, (void *)(uintptr_t)3, &f2, 0);
        if (r < 0)
            break;
        moved += r;
        if (moved < 3)
            usleep(1000);
    }
    long wake2 = futex(&f2, FUTEX_WAKE_PRIVATE, 1, NULL, NULL, 0);
    wait_woken(1);
    long eagain = futex(&f2, FUTEX_CMP_REQUEUE_PRIVATE, 0, (void *)(uintptr_t)1, &f3, 5);
    long req = futex(&f2, FUTEX_REQUEUE_PRIVATE, 1, (void *)(uintptr_t)1, &f3, 0);
    wait_woken(2);
    long wake3 = futex(&f3, FUTEX_WAKE_PRIVATE, 1, NULL, NULL, 0);
    long rets = 0;
    for (int i = 0; i < 3; i++) {
        void *ret;
        pthread_join(t[i], &ret);
        rets += (long)ret;
    }
    printf("requeue: moved=%ld wake_f2=%ld eagain=%d requeue=%ld wake_f3=%ld joined=%d rets=%ld\n",
           moved, wake2, eagain == -EAGAIN, req, wake3, atomic_load(&woken), rets);
}

static void wake_op(void) {
    pthread_t t;
    atomic_store(&woken, 0);
    pthread_create(&t, NULL, waiter, &f4);
    long r = 0;
    /* *f5 = 7 (old 0: compare true, but no one waits on f5); wake one on f4 */
    while ((r = futex(&f4, FUTEX_WAKE_OP_PRIVATE, 1, (void *)(uintptr_t)1, &f5,
                      FUTEX_OP(FUTEX_OP_SET, 7, FUTEX_OP_CMP_EQ, 0))) == 0)
        usleep(1000);
    pthread_join(t, NULL);
    printf("wake_op: woke=%ld f5=%u\n", r, f5);
}

/* A POSIX timer whose SIGUSR2 goes to one thread (SIGEV_THREAD_ID), the others block it. */
static volatile pid_t target_tid, handler_tid;
static volatile int timer_code;

static void on_usr2(int sig, siginfo_t *si, void *uc) {
    (void)sig; (void)uc;
    handler_tid = (pid_t)syscall(SYS_gettid);
    timer_code = si->si_code;
}

static void *target(void *arg) {
    (void)arg;
    sigset_t s;
    sigemptyset(&s);
    sigaddset(&s, SIGUSR2);
    pthread_sigmask(SIG_UNBLOCK, &s, NULL);
    target_tid = (pid_t)syscall(SYS_gettid);
    while (!handler_tid)
        pause();
    return NULL;
}

static void thread_timer(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_usr2;
    sa.sa_flags = SA_SIGINFO;
    sigaction(SIGUSR2, &sa, NULL);
    sigset_t s;
    sigemptyset(&s);
    sigaddset(&s, SIGUSR2);
    pthread_sigmask(SIG_BLOCK, &s, NULL);
    pthread_t t;
    pthread_create(&t, NULL, target, NULL);
    while (!target_tid)
        sched_yield();
    struct sigevent ev;
    memset(&ev, 0, sizeof ev);
    ev.sigev_notify = SIGEV_THREAD_ID;
    ev.sigev_signo = SIGUSR2;
    ev._sigev_un._tid = target_tid;
    timer_t tm;
    int rc = timer_create(CLOCK_MONOTONIC, &ev, &tm);
    struct itimerspec its = {{0, 0}, {0, 5000000}};
    timer_settime(tm, 0, &its, NULL);
    pthread_join(t, NULL);
    timer_delete(tm);
    printf("timer_thread_id: rc=%d handler_in_target=%d code_si_timer=%d\n", rc,
           handler_tid == target_tid, timer_code == SI_TIMER);
}

static sigjmp_buf env;
static volatile int fault_code;
static volatile void *fault_addr;

static void on_fault(int sig, siginfo_t *si, void *uc) {
    (void)uc;
    fault_code = si->si_code;
    fault_addr = si->si_addr;
    siglongjmp(env, sig);
}

static int catch(int sig, void (*fn)(void)) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_fault;
    sa.sa_flags = SA_SIGINFO;
    sigaction(sig, &sa, NULL);
    fault_code = 0;
    int got = sigsetjmp(env, 1);
    if (got == 0)
        fn();
    return got;
}

static volatile int zero;
static volatile int quotient;
static void divide(void) { quotient = 7 / zero; }

static void sigfpe(void) {
    int sig = catch(SIGFPE, divide);
    printf("divide: sig=%d code=%d\n", sig, fault_code);
}

static pthread_mutex_t robust_mutex;
static void *die_holding(void *arg) {
    (void)arg;
    pthread_mutex_lock(&robust_mutex);
    return NULL;                        /* exits owning it */
}

static void robust(void) {
    pthread_mutexattr_t ma;
    pthread_mutexattr_init(&ma);
    pthread_mutexattr_setrobust(&ma, PTHREAD_MUTEX_ROBUST);
    pthread_mutex_init(&robust_mutex, &ma);
    pthread_t t;
    pthread_create(&t, NULL, die_holding, NULL);
    pthread_join(t, NULL);
    int first = pthread_mutex_lock(&robust_mutex);
    int consistent = pthread_mutex_consistent(&robust_mutex);
    pthread_mutex_unlock(&robust_mutex);
    int again = pthread_mutex_lock(&robust_mutex);
    printf("robust: first=%s consistent=%d again=%d\n", first == EOWNERDEAD ? "EOWNERDEAD" : "other",
           consistent, again);
}

static volatile char *past_eof;
static void touch(void) { (void)past_eof[0]; }

static void sigbus(const char *path) {
    int fd = open(path, O_RDONLY);
    long page = sysconf(_SC_PAGESIZE);
    char *map = mmap(NULL, 2 * page, PROT_READ, MAP_PRIVATE, fd, 0);
    if (fd < 0 || map == MAP_FAILED) {
        printf("sigbus: cannot map %s\n", path);
        return;
    }
    past_eof = map + page;
    int sig = catch(SIGBUS, touch);
    printf("sigbus: first_page=%c sig=%d code=%d addr_ok=%d\n", map[0], sig, fault_code,
           fault_addr == past_eof);
}

int main(int argc, char **argv) {
    const char *mode = argc > 1 ? argv[1] : "";
    if (!strcmp(mode, "robust")) {
        robust();
        return 0;
    }
    if (!strcmp(mode, "bus") && argc > 2) {
        sigbus(argv[2]);
        return 0;
    }
    if (!strcmp(mode, "vfork")) {
        pid_t pid = vfork();
        if (pid == 0)
            _exit(0);
        printf("vfork: %d %s\n", pid, pid < 0 ? strerror(errno) : "");
        return 0;
    }
    tid_address();
    futex_waits();
    requeue();
    wake_op();
    thread_timer();
    sigfpe();
    return 0;
}
