/* A hostile guest for Linux user mode: one subcommand per attack (tests/test_linux_hostile.py).
   Built static with glibc for arm64 and x86-64; raw syscall(2) where glibc would hide the call. */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

static long raw(long nr, long a, long b, long c, long d, long e, long f)
{
	long r = syscall(nr, a, b, c, d, e, f);
	return r < 0 ? -errno : r;
}

/* writev of n iovecs aliasing one buffer of `size` bytes, to /dev/null. */
static int cmd_writev(long size, int n)
{
	char *buf = malloc(size);
	struct iovec *iov = calloc(n, sizeof *iov);
	memset(buf, 'x', size);
	for (int i = 0; i < n; i++)
		iov[i] = (struct iovec){buf, size};
	int fd = open("/dev/null", O_WRONLY);
	ssize_t r = writev(fd, iov, n);
	ssize_t w = write(fd, buf, size);
	printf("writev=%zd write=%zd\n", r, w);
	return 0;
}

static int cmd_pipe(void)
{
	int p[2];
	char chunk[4096] = {0};
	if (pipe2(p, O_NONBLOCK))
		return 1;
	long total = 0;
	ssize_t r;
	while ((r = write(p[1], chunk, sizeof chunk)) > 0)
		total += r;
	printf("filled=%ld errno=%s\n", total, errno == EAGAIN ? "EAGAIN" : strerror(errno));
	char big[100];
	r = read(p[0], big, sizeof big);
	printf("read=%zd\n", r);
	r = write(p[1], chunk, 200);              /* 100 bytes free: PIPE_BUF atomicity */
	printf("atomic=%zd %s\n", r, r < 0 && errno == EAGAIN ? "EAGAIN" : "");
	r = write(p[1], chunk, 100);
	printf("fits=%zd\n", r);
	int q[2];
	pipe(q);
	fcntl(q[0], F_SETFL, O_NONBLOCK);
	r = read(q[0], big, 10);
	printf("empty=%zd %s\n", r, r < 0 && errno == EAGAIN ? "EAGAIN" : "");
	write(q[1], "abc", 3);
	close(q[1]);
	r = read(q[0], big, 10);
	printf("drain=%zd\n", r);
	r = read(q[0], big, 10);
	printf("eof=%zd\n", r);
	signal(SIGPIPE, SIG_IGN);
	r = write(p[1], chunk, 0) == 0 ? 0 : -1;
	close(p[0]);
	r = write(p[1], chunk, 10);
	printf("noreader=%zd %s\n", r, r < 0 && errno == EPIPE ? "EPIPE" : "");
	fflush(stdout);
	return 0;
}

static int cmd_pipe_block(void)
{
	int p[2];
	static char buf[1 << 20];
	pipe(p);
	puts("writing");
	fflush(stdout);
	write(p[1], buf, sizeof buf);          /* nobody will ever read: blocks for ever */
	puts("unreachable");
	return 0;
}

static int cmd_readv(void)
{
	char a[8], b[64];
	struct iovec iov[2] = {{a, 4}, {b, (size_t)1 << 40}};
	printf("huge=%ld\n", raw(SYS_readv, 0, (long)iov, 2, 0, 0, 0));
	printf("a=%.4s b=%.3s\n", a, b);
	iov[1].iov_len = (size_t)-1;
	printf("negative=%ld\n", raw(SYS_readv, 0, (long)iov, 2, 0, 0, 0));
	iov[1].iov_len = (size_t)1 << 62;
	printf("beyond=%ld\n", raw(SYS_readv, 0, (long)iov, 2, 0, 0, 0));
	printf("toomany=%ld\n", raw(SYS_readv, 0, (long)iov, 1025, 0, 0, 0));
	return 0;
}

/* Map `gib` GiB (default 8) of a sparse file with data at its start and at the middle. */
static int cmd_mmap_sparse(const char *path, int gib)
{
	int fd = open(path, O_RDONLY);
	size_t len = (size_t)gib << 30, mid = len / 2;
	unsigned char *m = mmap(NULL, len, PROT_READ, MAP_PRIVATE, fd, 0);
	if (m == MAP_FAILED) {
		printf("mmap: %s\n", strerror(errno));
		return 1;
	}
	printf("%c%c %c%c %d\n", m[0], m[1], m[mid + 7], m[mid + 8], m[len - 1]);
	void *w = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	printf("shared-write-on-rdonly=%s\n", w == MAP_FAILED && errno == EACCES ? "EACCES" : "mapped");
	return 0;
}

static int cmd_mmap_eof(const char *path)
{
	int fd = open(path, O_RDONLY);
	volatile unsigned char *m = mmap(NULL, 3 * 4096, PROT_READ, MAP_PRIVATE, fd, 0);
	printf("%c %d\n", m[0], m[4000]);
	fflush(stdout);
	printf("%d\n", m[4096 + 1]);             /* wholly past EOF: SIGBUS natively */
	return 0;
}

static int cmd_mmaps(int n)
{
	long sum = 0;
	for (int i = 0; i < n; i++) {
		char *p = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		if (p == MAP_FAILED) {
			printf("failed at %d: %s\n", i, strerror(errno));
			return 1;
		}
		p[0] = 1;
		sum += p[0];
	}
	printf("mapped=%ld\n", sum);
	return 0;
}

static int cmd_nomem(void)
{
	void *p = mmap(NULL, (size_t)1 << 30, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	printf("1G=%s\n", p == MAP_FAILED ? strerror(errno) : "ok");
	void *q = mmap(NULL, (size_t)8 << 20, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	printf("8M=%s\n", q == MAP_FAILED ? strerror(errno) : "ok");
	void *b = sbrk(1 << 30);
	printf("brk1G=%s\n", b == (void *)-1 ? strerror(errno) : "ok");
	void *r = mremap(q, 8 << 20, (size_t)1 << 30, MREMAP_MAYMOVE);
	printf("mremap1G=%s\n", r == MAP_FAILED ? strerror(errno) : "ok");
	return 0;
}

static int cmd_nx(void)
{
#if defined(__x86_64__)
	static const unsigned char code[] = {0xb8, 0x2a, 0, 0, 0, 0xc3};    /* mov eax, 42; ret */
#else
	static const uint32_t code[] = {0x52800540, 0xd65f03c0};           /* mov w0, #42; ret */
#endif
	char *p = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	memcpy(p, code, sizeof code);
	__builtin___clear_cache(p, p + sizeof code);
	mprotect(p, 4096, PROT_READ | PROT_EXEC);
	int (*fn)(void) = (int (*)(void))p;
	printf("first=%d\n", fn());
	fflush(stdout);
	mprotect(p, 4096, PROT_READ);
	printf("second=%d\n", fn());
	return 0;
}

static int cmd_time(void)
{
	struct timespec a, b, req = {LONG_MAX, 999999999};
	raw(SYS_clock_gettime, CLOCK_MONOTONIC, (long)&a, 0, 0, 0, 0);
	printf("sleep=%ld\n", raw(SYS_nanosleep, (long)&req, 0, 0, 0, 0, 0));
	raw(SYS_clock_gettime, CLOCK_MONOTONIC, (long)&b, 0, 0, 0, 0);
	printf("forward=%d\n", b.tv_sec > a.tv_sec);
	printf("again=%ld\n", raw(SYS_nanosleep, (long)&req, 0, 0, 0, 0, 0));
	raw(SYS_clock_gettime, CLOCK_MONOTONIC, (long)&a, 0, 0, 0, 0);
	printf("monotonic=%d\n", a.tv_sec > b.tv_sec || (a.tv_sec == b.tv_sec && a.tv_nsec >= b.tv_nsec));
	raw(SYS_clock_gettime, CLOCK_REALTIME, (long)&b, 0, 0, 0, 0);
	printf("realtime-positive=%d\n", b.tv_sec > 0);
	struct timespec bad = {1, 1000000000}, neg = {0, -1};
	printf("nsec-too-big=%ld\n", raw(SYS_nanosleep, (long)&bad, 0, 0, 0, 0, 0));
	printf("nsec-negative=%ld\n", raw(SYS_nanosleep, (long)&neg, 0, 0, 0, 0, 0));
	printf("null-ts=%ld\n", raw(SYS_clock_gettime, CLOCK_MONOTONIC, 0, 0, 0, 0, 0));
	printf("bad-clock=%ld\n", raw(SYS_clock_gettime, 99, (long)&a, 0, 0, 0, 0));
	printf("futex-wake-unmapped=%ld\n", raw(SYS_futex, 0xdead0000, 1, 1, 0, 0, 0));
	printf("futex-wait-unmapped=%ld\n", raw(SYS_futex, 0xdead0000, 0, 1, 0, 0, 0));
	return 0;
}

static void hexprint(const char *label, const char *s)
{
	printf("%s=", label);
	for (; *s; s++)
		printf((unsigned char)*s >= 0x80 ? "\\x%02x" : "%c", (unsigned char)*s);
	printf("\n");
}

static int cmd_names(const char *dir, const char *arg)
{
	hexprint("arg", arg);
	char path[4096];
	snprintf(path, sizeof path, "%s/made\xff.txt", dir);
	int fd = open(path, O_CREAT | O_WRONLY, 0644);
	printf("create=%s\n", fd >= 0 ? "ok" : strerror(errno));
	close(fd);
	DIR *d = opendir(dir);
	struct dirent *e;
	while (d && (e = readdir(d)))
		if (e->d_name[0] != '.')
			hexprint("entry", e->d_name);
	struct stat st;
	printf("stat=%s\n", stat(path, &st) == 0 ? "ok" : strerror(errno));
	if (chdir(dir) == 0) {
		char cwd[4096];
		hexprint("cwd-ends", getcwd(cwd, sizeof cwd) ? strrchr(cwd, '/') + 1 : "?");
	}
	return 0;
}

static int cmd_links(const char *dir)
{
	char path[8192], buf[256];
	snprintf(path, sizeof path, "%s/link", dir);
	ssize_t n = readlink(path, buf, sizeof buf - 1);
	buf[n > 0 ? n : 0] = 0;
	printf("readlink=%zd %s\n", n, buf);
	struct stat st;
	printf("lstat-is-link=%d\n", lstat(path, &st) == 0 && S_ISLNK(st.st_mode));
	printf("stat-is-reg=%d\n", stat(path, &st) == 0 && S_ISREG(st.st_mode));
	memset(path, 'a', 5000);
	path[5000] = 0;
	printf("toolong=%s\n", open(path, O_RDONLY) < 0 && errno == ENAMETOOLONG ? "ENAMETOOLONG" : "?");
	printf("bigfd=%ld\n", raw(SYS_close, 0x80000000L, 0, 0, 0, 0, 0));
	printf("bigfd-dup=%ld\n", raw(SYS_dup3, 1, 0x80000005L, 0, 0, 0, 0));
	return 0;
}

static int cmd_chmod(const char *dir)
{
	char path[4096];
	snprintf(path, sizeof path, "%s/f", dir);
	printf("chmod=%ld\n", raw(SYS_fchmodat, AT_FDCWD, (long)path, 0600, 0, 0, 0));
	int fd = open(path, O_RDONLY);
	printf("fchmod=%ld\n", raw(SYS_fchmod, fd, 0640, 0, 0, 0, 0));
	struct stat st;
	stat(path, &st);
	printf("mode=%o\n", st.st_mode & 0777);
	printf("chown=%ld\n", raw(SYS_fchownat, AT_FDCWD, (long)path, getuid(), getgid(), 0, 0));
	printf("fchown=%ld\n", raw(SYS_fchown, fd, -1, -1, 0, 0, 0));
	struct timespec ts[2] = {{1000000000, 0}, {1234567890, 0}};
	printf("utimensat=%ld\n", raw(SYS_utimensat, AT_FDCWD, (long)path, (long)ts, 0, 0, 0));
	stat(path, &st);
	printf("mtime=%ld\n", (long)st.st_mtime);
	printf("outside=%ld\n", raw(SYS_fchmodat, AT_FDCWD, (long)"/etc/passwd", 0777, 0, 0, 0));
	return 0;
}

static void on_usr2(int sig) { (void)sig; puts("handled"); }

static int cmd_signals(const char *which)
{
	signal(SIGUSR1, SIG_IGN);
	raise(SIGUSR1);
	puts("ignored SIGUSR1");
	signal(SIGUSR2, on_usr2);
	raise(SIGUSR2);
	raise(SIGUSR2);
	puts("alive after SIGUSR2");
	fflush(stdout);
	kill(getpid(), strcmp(which, "term") == 0 ? SIGTERM : SIGSEGV);
	puts("not reached");
	return 0;
}

static int cmd_procs(void)
{
	pid_t pid = fork();
	printf("fork=%d %s\n", pid, pid < 0 ? strerror(errno) : "");
	pid = fork();
	printf("fork-again=%d\n", pid);
	printf("clone=%ld\n", raw(SYS_clone, SIGCHLD, 0, 0, 0, 0, 0));
	char *argv[] = {"x", NULL};
	printf("execve=%ld\n", raw(SYS_execve, (long)"/bin/true", (long)argv, (long)(argv + 1), 0, 0, 0));
	return 0;
}

int main(int argc, char **argv)
{
	const char *cmd = argc > 1 ? argv[1] : "";
	if (!strcmp(cmd, "writev"))
		return cmd_writev(atol(argv[2]), atoi(argv[3]));
	if (!strcmp(cmd, "pipe"))
		return cmd_pipe();
	if (!strcmp(cmd, "pipe-block"))
		return cmd_pipe_block();
	if (!strcmp(cmd, "read")) {
		char b[100];
		printf("read=%zd\n", read(0, b, sizeof b));
		return 0;
	}
	if (!strcmp(cmd, "readv"))
		return cmd_readv();
	if (!strcmp(cmd, "mmap-sparse"))
		return cmd_mmap_sparse(argv[2], argc > 3 ? atoi(argv[3]) : 8);
	if (!strcmp(cmd, "mmap-eof"))
		return cmd_mmap_eof(argv[2]);
	if (!strcmp(cmd, "mmaps"))
		return cmd_mmaps(atoi(argv[2]));
	if (!strcmp(cmd, "nomem"))
		return cmd_nomem();
	if (!strcmp(cmd, "nx"))
		return cmd_nx();
	if (!strcmp(cmd, "time"))
		return cmd_time();
	if (!strcmp(cmd, "names"))
		return cmd_names(argv[2], argv[3]);
	if (!strcmp(cmd, "links"))
		return cmd_links(argv[2]);
	if (!strcmp(cmd, "chmod"))
		return cmd_chmod(argv[2]);
	if (!strcmp(cmd, "signals"))
		return cmd_signals(argc > 2 ? argv[2] : "segv");
	if (!strcmp(cmd, "procs"))
		return cmd_procs();
	fprintf(stderr, "unknown command %s\n", cmd);
	return 2;
}
