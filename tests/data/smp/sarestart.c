/* SA_RESTART: the main thread blocks, another thread sends it SIGUSR1, then unblocks it.
 * - a read() of an empty pipe (the other thread then writes): with SA_RESTART the read runs
 *   again and returns the data; without, it fails with EINTR.
 * - `futex`: a raw FUTEX_WAIT (the other thread then sets the word and wakes it). Untimed,
 *   futex_wait returns -ERESTARTSYS: run again with SA_RESTART (0 at the wake), EINTR
 *   without. With `timeout` it is -ERESTART_RESTARTBLOCK, which a handler makes EINTR.
 * Usage: sarestart [futex] [norestart] [timeout] */
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

static int fds[2], word, use_futex;
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
	if (use_futex) {
		__atomic_store_n(&word, 1, __ATOMIC_SEQ_CST);
		syscall(SYS_futex, &word, FUTEX_WAKE, 1, NULL, NULL, 0);
	} else if (write(fds[1], "hello", 5) != 5) {
		return (void *)1;
	}
	return NULL;
}

static int has(int argc, char **argv, const char *word_)
{
	for (int i = 1; i < argc; i++)
		if (strcmp(argv[i], word_) == 0)
			return 1;
	return 0;
}

int main(int argc, char **argv)
{
	struct timespec limit = {30, 0};
	struct sigaction sa;
	char buf[16] = {0};
	pthread_t t;
	ssize_t n;

	use_futex = has(argc, argv, "futex");
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_usr1;
	sa.sa_flags = has(argc, argv, "norestart") ? 0 : SA_RESTART;
	sigaction(SIGUSR1, &sa, NULL);
	if (pipe(fds))
		return 2;
	main_thread = pthread_self();
	pthread_create(&t, NULL, sender, NULL);
	if (use_futex) {
		long r = syscall(SYS_futex, &word, FUTEX_WAIT, 0,
				 has(argc, argv, "timeout") ? &limit : NULL, NULL, 0);
		printf("handled=%d wait=%ld%s\n", (int)handled, r,
		       r < 0 && errno == EINTR ? " EINTR" : "");
		pthread_join(t, NULL);
		return 0;
	}
	n = read(fds[0], buf, sizeof(buf) - 1);
	if (n < 0)
		printf("handled=%d read=-1 %s\n", (int)handled, errno == EINTR ? "EINTR" : "other");
	else
		printf("handled=%d read=%zd %s\n", (int)handled, n, buf);
	pthread_join(t, NULL);
	if (n < 0 && read(fds[0], buf, sizeof(buf) - 1) == 5)
		printf("then read=5 %.5s\n", buf);
	return 0;
}
