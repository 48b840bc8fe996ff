/* File access under --fs: `files read PATH` prints the file and its size (stat),
 * `files write PATH` tries to create a file. Failures print the errno name. */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static const char *ename(int e)
{
    switch (e) {
    case ENOENT: return "ENOENT";
    case EROFS: return "EROFS";
    case EACCES: return "EACCES";
    case EPERM: return "EPERM";
    default: return strerror(e);
    }
}

int main(int argc, char **argv)
{
    if (argc < 3) { fprintf(stderr, "usage: files read|write PATH\n"); return 2; }
    if (!strcmp(argv[1], "read")) {
        FILE *f = fopen(argv[2], "r");
        if (!f) { printf("open %s: %s\n", argv[2], ename(errno)); return 1; }
        struct stat sb;
        if (fstat(fileno(f), &sb)) { printf("fstat: %s\n", ename(errno)); return 1; }
        printf("size=%lld\n", (long long)sb.st_size);
        char buf[256];
        size_t n;
        while ((n = fread(buf, 1, sizeof buf, f)) > 0) fwrite(buf, 1, n, stdout);
        fclose(f);
        return 0;
    }
    int fd = open(argv[2], O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0) { printf("create %s: %s\n", argv[2], ename(errno)); return 1; }
    if (write(fd, "written\n", 8) != 8) { printf("write: %s\n", ename(errno)); return 1; }
    close(fd);
    printf("created %s\n", argv[2]);
    return 0;
}
