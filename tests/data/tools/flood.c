/* Writes argv[1] MiB to stdout, one MiB per write(2), after one call of a tiny function
 * (the one the tools tests probe): a guest whose output must never be held whole. */
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static char chunk[1 << 20];

__attribute__((noinline)) int tick(int x) { return x + 1; }

int main(int argc, char **argv) {
    long mib = argc > 1 ? atol(argv[1]) : 1;
    memset(chunk, 'x', sizeof chunk);
    chunk[sizeof chunk - 1] = '\n';
    int t = tick(0);
    for (long i = 0; i < mib; i++)
        if (write(1, chunk, sizeof chunk) != (long)sizeof chunk) return 1;
    return t == 1 ? 0 : 2;
}
