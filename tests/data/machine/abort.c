/* abort(): the process dies of SIGABRT (shell status 134); unflushed stdio output is lost. */
#include <stdio.h>
#include <stdlib.h>

int main(void)
{
    fputs("flushed line\n", stderr);
    printf("buffered, never flushed\n");
    abort();
}
