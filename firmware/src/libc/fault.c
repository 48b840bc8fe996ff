/* fault.c - "fault crash" stores through a wild pointer (address 0x10) and
 * dies with SIGSEGV; any other invocation prints ok and exits 0. */
#include <stdio.h>
#include <string.h>

int main(int argc, char **argv)
{
	if (argc > 1 && strcmp(argv[1], "crash") == 0) {
		static volatile unsigned long wild_addr = 0x10;
		volatile int *wild = (volatile int *)wild_addr;

		printf("fault: storing to %p\n", (void *)wild);
		fflush(stdout);
		*wild = 42;
		printf("fault: survived?!\n");
		return 4;
	}
	printf("fault: ok\n");
	return 0;
}
