/* The host of tests/test_module_*.py: calls through mod_hook, which a loaded module's
 * init_module sets and its cleanup_module clears; checkpoint(i) is where a test's probe
 * loads or unloads the module while the program runs. */
#include <stdio.h>

long (*volatile mod_hook)(long, long);
long host_calls;

__attribute__((noinline)) long host_scale(long v)
{
	host_calls++;
	return v * 10;
}

__attribute__((noinline)) void checkpoint(int i)
{
	__asm__ volatile("" : : "r"(i) : "memory");
}

int main(void)
{
	long sum = 0;

	for (int i = 0; i < 8; i++) {
		checkpoint(i);
		long (*f)(long, long) = mod_hook;
		if (f)
			sum += f(i, 100);
	}
	printf("sum=%ld host_calls=%ld\n", sum, host_calls);
	return 0;
}
