/* SA_RESTART: the main thread blocks in read() of an empty pipe; another thread sends it
 * SIGUSR1, then writes to the pipe. With SA_RESTART the read runs again and returns the
 * data; without, it fails with EINTR. Usage: sarestart [norestart] */
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static int fds[2];
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
	if (write(fds[1], "hello", 5) != 5)
		return (void *)1;
	return NULL;
}

int main(int argc, char **argv)
{
	struct sigaction sa;
	char buf[16] = {0};
	pthread_t t;
	ssize_t n;

	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_usr1;
	sa.sa_flags = argc > 1 ? 0 : SA_RESTART;
	sigaction(SIGUSR1, &sa, NULL);
	if (pipe(fds))
		return 2;
	main_thread = pthread_self();
	pthread_create(&t, NULL, sender, NULL);
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
