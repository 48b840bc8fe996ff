/* rt_sigaction straight through syscall(2), without SA_RESTORER (glibc's sigaction always
 * adds one). x86-64 cannot build the signal frame (no return address): the process dies
 * of SIGSEGV when the signal is delivered. arm64 returns through the vDSO's sigtramp. */
#include <signal.h>
#include <stdio.h>
#include <sys/syscall.h>
#include <unistd.h>

struct kernel_sigaction {
	void (*handler)(int);
	unsigned long flags;
	void (*restorer)(void);
	unsigned long mask;
};

static volatile int handled;

static void on_usr1(int sig)
{
	handled = sig;
}

int main(void)
{
	struct kernel_sigaction sa = {on_usr1, 0, 0, 0};

	if (syscall(SYS_rt_sigaction, SIGUSR1, &sa, NULL, 8))
		return 2;
	printf("installed\n");
	fflush(stdout);
	syscall(SYS_tgkill, getpid(), syscall(SYS_gettid), SIGUSR1);
	printf("handled=%d\n", handled);
	return 0;
}
