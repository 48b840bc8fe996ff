/* stdin_wc.c - reads stdin to EOF with read(2) and prints line/word/byte
 * counts plus an FNV-1a checksum of the data. */
#include <stdio.h>
#include <unistd.h>
#include <ctype.h>
#include <errno.h>

int main(void)
{
	static unsigned char buf[4096];
	unsigned long lines = 0, words = 0, bytes = 0, longest = 0, cur = 0;
	unsigned int hash = 2166136261u;
	int in_word = 0;
	ssize_t n, i;

	for (;;) {
		n = read(0, buf, sizeof(buf));
		if (n < 0) {
			if (errno == EINTR)
				continue;
			perror("stdin_wc: read");
			return 1;
		}
		if (n == 0)
			break;
		for (i = 0; i < n; i++) {
			unsigned char c = buf[i];

			hash = (hash ^ c) * 16777619u;
			if (c == '\n') {
				lines++;
				if (cur > longest)
					longest = cur;
				cur = 0;
			} else {
				cur++;
			}
			if (isspace(c)) {
				in_word = 0;
			} else if (!in_word) {
				in_word = 1;
				words++;
			}
		}
		bytes += (unsigned long)n;
	}
	if (cur > longest)
		longest = cur;
	printf("lines=%lu words=%lu bytes=%lu longest=%lu fnv1a=%08x\n", lines, words, bytes,
	       longest, hash);
	return 0;
}
