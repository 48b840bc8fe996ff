/* Calls memcpy and strlen, IFUNCs in static glibc, a known number of times from main
   (built with -fno-builtin so each call goes through the IRELATIVE slot). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int main(int argc, char **argv) {
    int n = argc > 1 ? atoi(argv[1]) : 10;
    char buf[64];
    size_t total = 0;
    for (int i = 0; i < n; i++) {
        memcpy(buf, "kprobe-emu", 11);
        total += strlen(buf) + strlen(argv[0]) * 0;
    }
    printf("calls %d total %zu\n", n, total);
    return 0;
}
