/* SA_RESTART and futex: the main thread waits on a futex word with a raw FUTEX_WAIT; another
 * thread sends it SIGUSR1, then sets the word and wakes it. Without a timeout the kernel's
 * futex_wait returns -ERESTARTSYS: with SA_RESTART the wait runs again and returns 0 at the
 * wake, without it fails with EINTR. With a timeout it is -ERESTART_RESTARTBLOCK, which a
 * handler always turns into EINTR. Usage: futexrestart [norestart] [timeout] */
#define _GNU_SOURCE
#include <errno.h>
#include <linux/futex.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static int word;
static pthread_t main_thread;
static volatile sig_atomic_t handled;

static void on_usr1(int sig)
{
	(void)sig;
	handled++;
}

static void pause_ms(long ms)
{
	struct timespec ts = {0, ms * 1000000L};

	nanosleep(&ts, NULL);
}

static void *sender(void *arg)
{
	(void)arg;
	pause_ms(100);
	pthread_kill(main_thread, SIGUSR1);
	pause_ms(100);
	__atomic_store_n(&word, 1, __ATOMIC_SEQ_CST);
	syscall(SYS_futex, &word, FUTEX_WAKE, 1, NULL, NULL, 0);
	return NULL;
}

int main(int argc, char **argv)
{
	struct timespec limit = {30, 0};
	int restart = 1, timed = 0;
	struct sigaction sa;
	pthread_t t;
	long r;

	for (int i = 1; i < argc; i++) {
		restart &= strcmp(argv[i], "norestart") != 0;
		timed |= strcmp(argv[i], "timeout") == 0;
	}
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_usr1;
	sa.sa_flags = restart ? SA_RESTART : 0;
	sigaction(SIGUSR1, &sa, NULL);
	main_thread = pthread_self();
	pthread_create(&t, NULL, sender, NULL);
	r = syscall(SYS_futex, &word, FUTEX_WAIT, 0, timed ? &limit : NULL, NULL, 0);
	printf("handled=%d wait=%ld%s\n", (int)handled, r, r < 0 && errno == EINTR ? " EINTR" : "");
	pthread_join(t, NULL);
	return 0;
}
