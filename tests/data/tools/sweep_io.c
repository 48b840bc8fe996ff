/* The sweep's inputs: hashes stdin through a tiny function (mix), reads argv[1] and
 * appends to argv[2] under --fs, prints AT_RANDOM bytes (--seed), exits with the hash. */
#include <fcntl.h>
#include <stdio.h>
#include <sys/auxv.h>
#include <unistd.h>

__attribute__((noinline)) unsigned mix(unsigned h, unsigned c) { return h * 31u + c; }
__attribute__((noinline)) unsigned never_called(unsigned x) { return x * 7u + 3u; }

static long file_size(const char *path) {
    char buf[512];
    long total = 0, n;
    int fd = open(path, O_RDONLY);
    if (fd < 0) return -1;
    while ((n = read(fd, buf, sizeof buf)) > 0) total += n;
    close(fd);
    return total;
}

int main(int argc, char **argv) {
    unsigned char buf[256];
    unsigned h = 0;
    long n = read(0, buf, sizeof buf);
    for (long i = 0; i < n; i++) h = mix(h, buf[i]);
    printf("stdin %ld bytes hash %08x\n", n, h);
    if (argc > 1) printf("%s: %ld bytes\n", argv[1], file_size(argv[1]));
    if (argc > 2) {
        int fd = open(argv[2], O_WRONLY | O_CREAT | O_APPEND, 0644);
        if (fd < 0) { perror("open"); return 100; }
        write(fd, "one more line\n", 14);
        close(fd);
        printf("%s: now %ld bytes\n", argv[2], file_size(argv[2]));
    }
    if (argc > 3) h = never_called(h);
    const unsigned char *r = (const unsigned char *)getauxval(AT_RANDOM);
    printf("random %02x%02x%02x%02x\n", r[0], r[1], r[2], r[3]);
    return (int)(h & 0x3f);
}
