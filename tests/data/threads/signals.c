/* Signal delivery as natively: handlers with siginfo, FP state kept across a handler,
   masks, raise/kill/tgkill to threads, sigaltstack, alarm + pause, setitimer and POSIX
   timers on the modelled clock. */
#define _GNU_SOURCE
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

static volatile sig_atomic_t got, last_code, on_alt, ticks;
static volatile double fp_in_handler;
static volatile pid_t handler_tid;
static char altstack[1 << 16];

static void on_info(int sig, siginfo_t *si, void *uc) {
    (void)uc;
    got = sig;
    last_code = si->si_code;
    handler_tid = (pid_t)syscall(SYS_gettid);
    volatile double x = 1.5;
    for (int i = 0; i < 10; i++)
        x = x * 3.25 - 0.5;                  /* clobbers FP registers */
    fp_in_handler = x;
    char here;
    on_alt = &here >= altstack && &here < altstack + sizeof altstack;
}

static void on_tick(int sig) { (void)sig; ticks++; }

static void *thread_main(void *arg) {
    (void)arg;
    while (!got)
        sched_yield();
    return NULL;
}

int main(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_info;
    sa.sa_flags = SA_SIGINFO;
    sigaction(SIGUSR1, &sa, NULL);

    volatile double a = 2.0, b = 0.0;
    b = a * 1.25;
    raise(SIGUSR1);
    printf("raise: sig=%d code=%s fp_kept=%d\n", got, last_code == SI_TKILL ? "SI_TKILL" : "?",
           b == 2.5 && a == 2.0);

    sigset_t block, old;
    sigemptyset(&block);
    sigaddset(&block, SIGUSR1);
    sigprocmask(SIG_BLOCK, &block, &old);
    got = 0;
    kill(getpid(), SIGUSR1);
    sigset_t pend;
    sigpending(&pend);
    printf("blocked: got=%d pending=%d\n", got, sigismember(&pend, SIGUSR1));
    sigprocmask(SIG_SETMASK, &old, NULL);
    printf("unblocked: got=%d code=%s\n", got, last_code == SI_USER ? "SI_USER" : "?");

    stack_t ss = {.ss_sp = altstack, .ss_size = sizeof altstack, .ss_flags = 0};
    sigaltstack(&ss, NULL);
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigaction(SIGUSR2, &sa, NULL);
    raise(SIGUSR2);
    printf("altstack: sig=%d on_alt=%d\n", got, on_alt);

    got = 0;
    pthread_t t;
    pthread_create(&t, NULL, thread_main, NULL);
    pthread_kill(t, SIGUSR1);
    pthread_join(t, NULL);
    printf("pthread_kill: got=%d in_main_thread=%d\n", got, handler_tid == getpid());

    signal(SIGALRM, on_tick);
    alarm(1);
    pause();
    printf("alarm+pause: ticks=%d\n", ticks);

    struct itimerval it = {.it_interval = {0, 10000}, .it_value = {0, 10000}};
    setitimer(ITIMER_REAL, &it, NULL);
    while (ticks < 6)
        ;                                    /* spins: the timer interrupts it */
    struct itimerval off = {0};
    setitimer(ITIMER_REAL, &off, NULL);
    printf("setitimer: ticks>=6=%d\n", ticks >= 6);

    timer_t timer;
    struct sigevent sev = {.sigev_notify = SIGEV_SIGNAL, .sigev_signo = SIGUSR1};
    timer_create(CLOCK_MONOTONIC, &sev, &timer);
    struct itimerspec its = {.it_value = {0, 5000000}};
    got = 0;
    timer_settime(timer, 0, &its, NULL);
    struct timespec nap = {0, 20000000};
    while (!got)
        nanosleep(&nap, NULL);
    printf("timer_create: got=%d code=%s\n", got, last_code == SI_TIMER ? "SI_TIMER" : "?");
    timer_delete(timer);
    return 0;
}
