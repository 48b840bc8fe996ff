/* argv, environment-free output and the exit code from argv[1]. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int main(int argc, char **argv)
{
    printf("hello from %s guest, argc=%d\n", sizeof(void *) == 8 ? "64-bit" : "32-bit", argc);
    for (int i = 1; i < argc; i++)
        printf("argv[%d]=%s (%zu)\n", i, argv[i], strlen(argv[i]));
    fprintf(stderr, "to stderr\n");
    return argc > 1 ? atoi(argv[1]) : 0;
}
