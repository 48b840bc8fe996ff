/* Threads, a mutex, a condition variable, atomics, TLS and join: the output is the same
   whatever the schedule. Usage: pthreads [NTHREADS] */
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
#include <sys/syscall.h>

#define ROUNDS 2000
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cond = PTHREAD_COND_INITIALIZER;
static long counter;
static atomic_long atomic_counter;
static int ready, arrived;
static __thread int tls_value;
static long tids_distinct[8];

/* A function every thread runs ROUNDS times: kprobe hits must count exactly. */
__attribute__((noinline)) void bump_counter(void) {
    counter++;
    __asm__ volatile("" ::: "memory");
}

static void *worker(void *arg) {
    long id = (long)arg;
    tls_value = (int)id * 10;
    tids_distinct[id] = syscall(SYS_gettid);
    pthread_mutex_lock(&lock);
    arrived++;
    pthread_cond_broadcast(&cond);
    while (!ready)
        pthread_cond_wait(&cond, &lock);
    pthread_mutex_unlock(&lock);
    for (int i = 0; i < ROUNDS; i++) {
        pthread_mutex_lock(&lock);
        bump_counter();
        if (i % 97 == 0)
            sched_yield();
        pthread_mutex_unlock(&lock);
        atomic_fetch_add(&atomic_counter, 1);
    }
    return (void *)(long)(tls_value + 1);
}

int main(int argc, char **argv) {
    int n = argc > 1 ? atoi(argv[1]) : 4;
    if (n < 1 || n > 8)
        return 2;
    pthread_t t[8];
    for (long i = 0; i < n; i++)
        if (pthread_create(&t[i], NULL, worker, (void *)i) != 0) {
            puts("pthread_create failed");
            return 1;
        }
    pthread_mutex_lock(&lock);
    while (arrived < n)
        pthread_cond_wait(&cond, &lock);
    ready = 1;
    pthread_cond_broadcast(&cond);
    pthread_mutex_unlock(&lock);
    long sum = 0;
    for (int i = 0; i < n; i++) {
        void *ret;
        pthread_join(t[i], &ret);
        sum += (long)ret;
    }
    int distinct = 1;
    for (int i = 0; i < n; i++)
        for (int j = 0; j < i; j++)
            if (tids_distinct[i] == tids_distinct[j] || tids_distinct[i] == getpid())
                distinct = 0;
    printf("threads=%d counter=%ld atomic=%ld sum=%ld distinct_tids=%d main_tls=%d\n", n,
           counter, (long)atomic_counter, sum, distinct, tls_value);
    return 0;
}
