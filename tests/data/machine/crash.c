/* A wild-pointer store in a named function: the run must stop with a one-line fault report. */
#include <stdio.h>

__attribute__((noinline)) void poke_wild(volatile unsigned long *p, unsigned long v)
{
    *p = v;
}

int main(void)
{
    puts("before the crash");
    fflush(stdout);
    poke_wild((volatile unsigned long *)0xdead0000UL, 42);
    puts("not reached");
    return 0;
}
