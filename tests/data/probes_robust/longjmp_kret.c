/* A kretprobe on a function a longjmp leaves: f(0) calls f(1) under setjmp, f(1) longjmps
   back into f(0), then f(0) returns normally. `deep` longjmps across several frames of g
   at once. Output and exit code must not change under --kretprobe f / g. */
#include <setjmp.h>
#include <stdio.h>

static jmp_buf env;
static volatile int sink;

__attribute__((noinline, noipa)) int f(int n)
{
    if (n == 0) {
        if (setjmp(env) == 0) {
            sink = f(1);
            return -1;                  /* not reached: f(1) longjmps */
        }
        return 20 + n;
    }
    longjmp(env, 1);
}

static jmp_buf genv;

__attribute__((noinline, noipa)) int g(int depth)
{
    if (depth == 0)
        longjmp(genv, 7);
    int r = g(depth - 1);               /* never returns normally */
    sink = r;
    return r + 1;
}

__attribute__((noinline, noipa)) int deep(int depth)
{
    int v = setjmp(genv);
    if (v == 0)
        return g(depth);
    return v + depth;
}

int main(void)
{
    int total = 0;
    for (int i = 0; i < 3; i++) {
        int r = f(0);
        printf("f(0) = %d\n", r);
        total += r;
    }
    for (int d = 1; d <= 4; d++) {
        int r = deep(d);
        printf("deep(%d) = %d\n", d, r);
        total += r;
    }
    printf("total %d\n", total);
    return total % 100;
}
