/* Reads all of stdin with read(2)-backed stdio: counts lines, words, bytes, and a checksum,
 * then prints the lines reversed and upper-cased. */
#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int main(void)
{
    char line[4096];
    char *lines[1024];
    int n = 0;
    unsigned long bytes = 0, words = 0, sum = 5381;
    while (fgets(line, sizeof line, stdin)) {
        size_t len = strlen(line);
        bytes += len;
        int in_word = 0;
        for (size_t i = 0; i < len; i++) {
            sum = sum * 33 + (unsigned char)line[i];
            if (isspace((unsigned char)line[i])) in_word = 0;
            else if (!in_word) { in_word = 1; words++; }
            line[i] = toupper((unsigned char)line[i]);
        }
        if (n < 1024) lines[n++] = strdup(line);
    }
    printf("lines=%d words=%lu bytes=%lu djb2=%08lx\n", n, words, bytes, sum & 0xffffffff);
    while (n--)
        fputs(lines[n], stdout);
    return 0;
}
