/* Cross-modifying code: a runner thread calls hot() in a loop while the main thread, on
 * another CPU, calls flip(); the emulator flips the static key `flip_key` there (a kprobe
 * on flip), so hot()'s jump-label site is rewritten while the runner executes it: a NOP
 * (hot returns 1) or a jump (hot returns 2). Any other result, a runner that does not
 * come back through its own return (derailed), or a crash, is a torn instruction.
 * Without the emulator's flips hot() always returns 1.
 * Usage: xmodify [FLIPS]; build with -I firmware/include. */
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include "kemu_tracepoint.h"

struct kemu_static_key flip_key;        /* false at start */
static atomic_int done;
static long ones, twos, others;

__attribute__((noinline)) int hot(void)
{
	if (kemu_static_branch_unlikely(&flip_key))
		return 2;
	return 1;
}

__attribute__((noinline)) void flip(int i)
{
	__asm__ volatile("" : : "r"(i) : "memory");
}

static void *runner(void *arg)
{
	(void)arg;
	while (!atomic_load(&done)) {
		int v = hot();

		if (v == 1)
			ones++;
		else if (v == 2)
			twos++;
		else
			others++;
	}
	return (void *)0x600d;
}

int main(int argc, char **argv)
{
	int flips = argc > 1 ? atoi(argv[1]) : 20;
	pthread_t t;
	void *ret = NULL;

	pthread_create(&t, NULL, runner, NULL);
	for (int i = 0; i < flips; i++) {
		flip(i);
		for (volatile int j = 0; j < 5000; j++)
			;
	}
	atomic_store(&done, 1);
	pthread_join(t, &ret);
	printf("flips=%d others=%ld saw_both=%d runner=%s\n", flips, others, ones > 0 && twos > 0,
	       ret == (void *)0x600d ? "ok" : "derailed");
	return 0;
}
