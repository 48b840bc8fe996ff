/* files.c - open/read/lseek/fstat on the file named by argv[1].
 * Exit 1 with a message on stderr if the open fails, 2 without argument. */
#include <stdio.h>
#include <string.h>
#include <errno.h>
#include <fcntl.h>
#include <unistd.h>
#include <sys/stat.h>

static void show(const char *what, const char *buf, ssize_t n)
{
	ssize_t i;

	printf("%s: %zd \"", what, n);
	for (i = 0; i < n; i++) {
		if (buf[i] == '\n')
			fputs("\\n", stdout);
		else if (buf[i] < 32 || buf[i] > 126)
			putchar('?');
		else
			putchar(buf[i]);
	}
	puts("\"");
}

int main(int argc, char **argv)
{
	static char data[65536];
	char buf[32];
	struct stat st;
	unsigned hash = 2166136261u;
	ssize_t n, total = 0;
	off_t pos;
	int fd, lines = 0;

	if (argc < 2) {
		fprintf(stderr, "usage: files FILE\n");
		return 2;
	}
	fd = open(argv[1], O_RDONLY);
	if (fd < 0) {
		fprintf(stderr, "files: cannot open %s: %s\n", argv[1], strerror(errno));
		return 1;
	}
	if (fstat(fd, &st) < 0) {
		perror("files: fstat");
		return 1;
	}
	printf("fstat: size=%lld regular=%d\n", (long long)st.st_size, S_ISREG(st.st_mode));
	while ((n = read(fd, data + total, sizeof(data) - (size_t)total)) > 0)
		total += n;
	for (n = 0; n < total; n++) {
		hash = (hash ^ (unsigned char)data[n]) * 16777619u;
		lines += data[n] == '\n';
	}
	printf("read: total=%zd lines=%d fnv1a=%08x size_matches=%d\n", total, lines, hash,
	       total == st.st_size);
	pos = lseek(fd, 0, SEEK_CUR);
	printf("lseek(0, SEEK_CUR) = %lld\n", (long long)pos);
	pos = lseek(fd, 6, SEEK_SET);
	n = read(fd, buf, 10);
	printf("lseek(6, SEEK_SET) = %lld, ", (long long)pos);
	show("read", buf, n);
	pos = lseek(fd, -12, SEEK_END);
	n = read(fd, buf, sizeof(buf));
	printf("lseek(-12, SEEK_END) = %lld, ", (long long)pos);
	show("read", buf, n);
	n = read(fd, buf, sizeof(buf));
	printf("read at EOF = %zd\n", n);
	pos = lseek(fd, -1, SEEK_SET);
	printf("lseek(-1, SEEK_SET) = %lld errno=%s\n", (long long)pos,
	       pos < 0 && errno == EINVAL ? "EINVAL" : "?");
	printf("close = %d\n", close(fd));
	n = read(fd, buf, 1);
	printf("read after close = %zd errno=%s\n", n, n < 0 && errno == EBADF ? "EBADF" : "?");
	return 0;
}
