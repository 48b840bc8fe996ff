/* plat_linux.c - Linux user-mode platform: raw syscalls only.
 *   write(2):      x86-64 nr 1,   arm64 nr 64
 *   exit_group(2): x86-64 nr 231, arm64 nr 94
 * Console output is line buffered: one write(1, ...) per line (or per 256
 * bytes), and the buffer is flushed by sys_exit. */
#include "platform.h"

const int platform_is_bare = 0;

#if defined(__x86_64__)
#define NR_write 1
#define NR_exit_group 231
static inline long syscall3(long nr, long a, long b, long c)
{
	long ret;

	asm volatile("syscall"
		     : "=a"(ret)
		     : "a"(nr), "D"(a), "S"(b), "d"(c)
		     : "rcx", "r11", "memory");
	return ret;
}
#elif defined(__aarch64__)
#define NR_write 64
#define NR_exit_group 94
static inline long syscall3(long nr, long a, long b, long c)
{
	register long x8 asm("x8") = nr;
	register long x0 asm("x0") = a;
	register long x1 asm("x1") = b;
	register long x2 asm("x2") = c;

	asm volatile("svc #0"
		     : "+r"(x0)
		     : "r"(x8), "r"(x1), "r"(x2)
		     : "memory");
	return x0;
}
#else
#error unsupported architecture
#endif

static char outbuf[256];
static unsigned outlen;

noinline long console_write(int fd, const void *buf, size_t len)
{
	return syscall3(NR_write, fd, (long)buf, (long)len);
}

void flush_console(void)
{
	unsigned off = 0;

	while (off < outlen) {
		long n = console_write(1, outbuf + off, outlen - off);

		if (n <= 0)
			break;
		off += (unsigned)n;
	}
	outlen = 0;
}

void putch(char c)
{
	outbuf[outlen++] = c;
	if (c == '\n' || outlen == sizeof(outbuf))
		flush_console();
}

void putstr(const char *s)
{
	while (*s)
		putch(*s++);
}

__noreturn void sys_exit(int code)
{
	flush_console();
	for (;;)
		syscall3(NR_exit_group, code, 0, 0);
}
