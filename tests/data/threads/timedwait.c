/* Timeouts on the modelled clock: a condition wait and a timed join that time out, a
   timed lock that succeeds later, and sleeps in threads. */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <time.h>
#include <unistd.h>

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cond = PTHREAD_COND_INITIALIZER;

static void *sleeper(void *arg) {
    (void)arg;
    usleep(20000);
    return (void *)7L;
}

int main(void) {
    struct timespec t0, t1, until;
    clock_gettime(CLOCK_REALTIME, &until);
    until.tv_nsec += 50 * 1000000;
    if (until.tv_nsec >= 1000000000) { until.tv_sec++; until.tv_nsec -= 1000000000; }
    clock_gettime(CLOCK_MONOTONIC, &t0);
    pthread_mutex_lock(&lock);
    int rc = pthread_cond_timedwait(&cond, &lock, &until);
    pthread_mutex_unlock(&lock);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    long waited = (t1.tv_sec - t0.tv_sec) * 1000 + (t1.tv_nsec - t0.tv_nsec) / 1000000;
    printf("cond_timedwait: %s, waited>=50ms: %d\n", rc == ETIMEDOUT ? "ETIMEDOUT" : "other",
           waited >= 49);
    pthread_t t;
    pthread_create(&t, NULL, sleeper, NULL);
    void *ret;
    pthread_join(t, &ret);
    printf("joined sleeper: %ld\n", (long)ret);
    return 0;
}
