/* A threaded guest whose output records its own interleaving, for snapshots (issue 19):
   a snapshot taken at checkpoint() holds threads blocked in timed condition waits and
   sleeps, a robust mutex, a periodic timer, a POSIX timer aimed at one thread, handlers,
   masks and an altstack; a restored run must print exactly what the straight run prints.
   Usage: snapthreads [NTHREADS] */
#define _GNU_SOURCE
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#define ROUNDS 300
#define LOG 4096
static char order[LOG];
static atomic_int pos;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cond = PTHREAD_COND_INITIALIZER;
static pthread_mutex_t robust;
static volatile sig_atomic_t ticks, usr1, on_alt;
static atomic_int started;
static int go;
static volatile pid_t worker1_tid;
static int nthreads;

__attribute__((noinline)) static void note(char c) {
    int i = atomic_fetch_add(&pos, 1);
    if (i < LOG - 1)
        order[i] = c;
}

static void on_alarm(int sig) { (void)sig; ticks++; note('!'); }

static void on_usr1(int sig) {
    char here;
    stack_t ss;
    (void)sig;
    sigaltstack(NULL, &ss);
    on_alt = (ss.ss_flags & SS_ONSTACK) && (char *)ss.ss_sp <= &here;
    usr1++;
    note('u');
}

__attribute__((noinline)) void checkpoint(void) { __asm__ volatile("" ::: "memory"); }

__attribute__((noinline)) static void spin(int n) {
    for (volatile int i = 0; i < n; i++)
        ;
}

static void *worker(void *arg) {
    long id = (long)arg;
    static char altstack[8][16384];
    stack_t ss = {.ss_sp = altstack[id], .ss_size = sizeof altstack[id], .ss_flags = 0};
    sigaltstack(&ss, NULL);
    if (id == 0)                        /* holds the robust mutex and dies with it */
        pthread_mutex_lock(&robust);
    if (id == (nthreads > 1)) {         /* the one thread that takes SIGUSR1 */
        sigset_t usr1set;
        sigemptyset(&usr1set);
        sigaddset(&usr1set, SIGUSR1);
        pthread_sigmask(SIG_UNBLOCK, &usr1set, NULL);
        worker1_tid = (pid_t)syscall(SYS_gettid);
    }
    atomic_fetch_add(&started, 1);
    pthread_mutex_lock(&lock);
    while (!go) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        ts.tv_nsec += 200000;
        if (ts.tv_nsec >= 1000000000) { ts.tv_sec++; ts.tv_nsec -= 1000000000; }
        pthread_cond_timedwait(&cond, &lock, &ts);
        note('w');
    }
    pthread_mutex_unlock(&lock);
    for (int i = 0; i < ROUNDS; i++) {
        note((char)('a' + id));
        spin(50 + 13 * (int)id);
        if (i % 50 == 7) {
            struct timespec d = {0, 30000 + 1000 * id};
            nanosleep(&d, NULL);
        }
        if (i % 37 == 3)
            sched_yield();
    }
    if (id == 0)
        return NULL;                    /* dies holding `robust`: the next locker owns it dead */
    return (void *)(long)syscall(SYS_gettid);
}

int main(int argc, char **argv) {
    int n = nthreads = argc > 1 ? atoi(argv[1]) : 3;
    if (n < 1 || n > 8)
        return 2;
    pthread_mutexattr_t ma;
    pthread_mutexattr_init(&ma);
    pthread_mutexattr_setrobust(&ma, PTHREAD_MUTEX_ROBUST);
    pthread_mutex_init(&robust, &ma);
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_alarm;
    sa.sa_flags = SA_RESTART;
    sigaction(SIGALRM, &sa, NULL);
    sa.sa_handler = on_usr1;
    sa.sa_flags = SA_RESTART | SA_ONSTACK;
    sigaction(SIGUSR1, &sa, NULL);
    sigset_t block;
    sigemptyset(&block);
    sigaddset(&block, SIGUSR1);
    pthread_sigmask(SIG_BLOCK, &block, NULL);       /* threads inherit it: only worker 1 unblocks */
    pthread_t t[8];
    for (long i = 0; i < n; i++)
        pthread_create(&t[i], NULL, worker, (void *)i);
    while (atomic_load(&started) < n)
        sched_yield();
    struct itimerval it = {{0, 100}, {0, 100}};
    setitimer(ITIMER_REAL, &it, NULL);
    struct sigevent ev;
    memset(&ev, 0, sizeof ev);
    ev.sigev_notify = SIGEV_THREAD_ID;
    ev.sigev_signo = SIGUSR1;
    ev._sigev_un._tid = worker1_tid;
    timer_t tm;
    timer_create(CLOCK_MONOTONIC, &ev, &tm);
    struct itimerspec its = {{0, 150000}, {0, 150000}};
    timer_settime(tm, 0, &its, NULL);
    kill(getpid(), SIGUSR1);            /* process-directed: only a worker can take it */
    checkpoint();
    pthread_mutex_lock(&lock);
    go = 1;
    pthread_cond_broadcast(&cond);
    pthread_mutex_unlock(&lock);
    long sum = 0;
    for (int i = 0; i < n; i++) {
        void *ret;
        pthread_join(t[i], &ret);
        sum += ret != NULL;
    }
    struct itimerval off = {{0, 0}, {0, 0}};
    setitimer(ITIMER_REAL, &off, NULL);
    timer_delete(tm);
    int rc = pthread_mutex_lock(&robust);
    if (rc == 130 /* EOWNERDEAD */)
        pthread_mutex_consistent(&robust);
    pthread_mutex_unlock(&robust);
    order[atomic_load(&pos) < LOG ? atomic_load(&pos) : LOG - 1] = 0;
    printf("threads=%d joined=%ld ticks>0=%d usr1>0=%d on_alt=%d robust=%d log=%d\n%s\n", n,
           sum, ticks > 0, usr1 > 0, (int)on_alt, rc, atomic_load(&pos), order);
    return 0;
}
