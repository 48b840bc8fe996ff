// A C++ exception thrown below a kretprobed frame (`middle`) and caught above it (main),
// and one caught inside the probed frame itself (`guarded`).
#include <cstdio>
#include <stdexcept>

static volatile int sink;

extern "C" __attribute__((noinline)) int thrower(int n)
{
    if (n > 2)
        throw std::runtime_error("boom");
    return n;
}

extern "C" __attribute__((noinline)) int middle(int n)
{
    int r = thrower(n);
    sink = r;
    return r + 1;
}

extern "C" __attribute__((noinline)) int guarded(int n)
{
    try {
        return thrower(n) * 2;
    } catch (const std::exception &) {
        return -1;
    }
}

int main()
{
    int total = 0;
    for (int i = 0; i < 5; i++) {
        total += guarded(i);
        try {
            total += middle(i);
        } catch (const std::exception &e) {
            std::printf("caught %s at %d\n", e.what(), i);
            total += 100;
        }
    }
    std::printf("total %d\n", total);
    return total % 256;
}
