/* x86-64: rdtscp's IA32_TSC_AUX holds the CPU number (Linux: node << 12 | cpu), the same
 * sched_getcpu answers. Each of 3 threads prints both. */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdio.h>

static unsigned aux[3];
static int cpu[3];

static void *worker(void *arg)
{
	long id = (long)arg;
	unsigned lo, hi, a;

	__asm__ volatile("rdtscp" : "=a"(lo), "=d"(hi), "=c"(a));
	aux[id] = a & 0xfff;
	cpu[id] = sched_getcpu();
	return NULL;
}

int main(void)
{
	pthread_t t[3];

	for (long i = 0; i < 3; i++)
		pthread_create(&t[i], NULL, worker, (void *)i);
	for (int i = 0; i < 3; i++)
		pthread_join(t[i], NULL);
	for (int i = 0; i < 3; i++)
		printf("thread %d tsc_aux %u cpu %d\n", i, aux[i], cpu[i]);
	return 0;
}
