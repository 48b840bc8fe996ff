/* Threads on several CPUs: each thread runs work() a number of times its id decides and
 * reports the CPU it ran on (sched_getcpu at its start and end: no migration), and how many
 * CPUs sched_getaffinity grants. Usage: percpu [NTHREADS (1-8)] */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>

static atomic_long total;
static int cpu_start[8], cpu_end[8];

/* The probed function: thread i runs it 300 + 100 * i times. */
__attribute__((noinline)) long work(long id, long i)
{
	atomic_fetch_add(&total, 1);
	__asm__ volatile("" ::: "memory");
	return id * i;
}

static void *worker(void *arg)
{
	long id = (long)arg, sum = 0;

	cpu_start[id] = sched_getcpu();
	for (long i = 0; i < 300 + 100 * id; i++)
		sum += work(id, i);
	cpu_end[id] = sched_getcpu();
	return (void *)sum;
}

int main(int argc, char **argv)
{
	int n = argc > 1 ? atoi(argv[1]) : 4;
	pthread_t t[8];
	cpu_set_t set;

	if (n < 1 || n > 8)
		return 2;
	CPU_ZERO(&set);
	if (sched_getaffinity(0, sizeof(set), &set))
		return 3;
	for (long i = 0; i < n; i++)
		pthread_create(&t[i], NULL, worker, (void *)i);
	for (int i = 0; i < n; i++)
		pthread_join(t[i], NULL);
	printf("affinity=%d main_cpu=%d total=%ld\n", CPU_COUNT(&set), sched_getcpu(),
	       (long)total);
	for (int i = 0; i < n; i++)
		printf("thread %d cpu %d %d calls %d\n", i, cpu_start[i], cpu_end[i], 300 + 100 * i);
	return 0;
}
