/* Threads that wait for each other by spinning on atomics, with no syscall in the loop:
   only preemption lets them finish. Usage: spin [NTHREADS] */
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>

static atomic_int turn;
static atomic_long total;
static int nthreads;

static void *worker(void *arg) {
    int id = (int)(long)arg;
    for (int round = 0; round < 3; round++) {
        while (atomic_load(&turn) % nthreads != id)
            ;                                   /* spin: no syscall */
        atomic_fetch_add(&total, id + 1);
        atomic_fetch_add(&turn, 1);
    }
    return NULL;
}

int main(int argc, char **argv) {
    nthreads = argc > 1 ? atoi(argv[1]) : 3;
    if (nthreads < 1 || nthreads > 8)
        return 2;
    pthread_t t[8];
    for (long i = 0; i < nthreads; i++)
        pthread_create(&t[i], NULL, worker, (void *)i);
    for (int i = 0; i < nthreads; i++)
        pthread_join(t[i], NULL);
    printf("turns=%d total=%ld\n", atomic_load(&turn), (long)atomic_load(&total));
    return 0;
}
