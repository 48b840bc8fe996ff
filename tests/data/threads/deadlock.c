/* Two threads each holding the mutex the other wants: a deadlock. */
#include <pthread.h>
#include <stdio.h>

static pthread_mutex_t a = PTHREAD_MUTEX_INITIALIZER, b = PTHREAD_MUTEX_INITIALIZER;
static pthread_barrier_t both;

static void *other(void *arg) {
    (void)arg;
    pthread_mutex_lock(&b);
    pthread_barrier_wait(&both);
    pthread_mutex_lock(&a);
    return NULL;
}

int main(void) {
    pthread_t t;
    pthread_barrier_init(&both, NULL, 2);
    pthread_create(&t, NULL, other, NULL);
    pthread_mutex_lock(&a);
    pthread_barrier_wait(&both);
    puts("locked a, waiting for b");
    fflush(stdout);
    pthread_mutex_lock(&b);
    puts("unreachable");
    return 0;
}
