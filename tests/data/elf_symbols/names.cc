// C++ names for the symbol service: a unique function, an overload set, a method in a
// namespace, and a function that faults on request (for the fault report's name).
#include <cstdio>
#include <cstdlib>

__attribute__((noipa)) int middle(int x) { return x / 2 + 1; }
__attribute__((noipa)) int scale(int x) { return x * 3; }
__attribute__((noipa)) double scale(double x) { return x * 1.5; }

namespace geo {
struct Box {
    int w, h;
    __attribute__((noipa)) int area() const { return w * h; }
};
}

__attribute__((noipa)) int crash(volatile int *p) { return *p; }

int main(int argc, char **argv) {
    int n = argc > 1 ? atoi(argv[1]) : 5;
    long sum = 0;
    for (int i = 0; i < n; i++) {
        geo::Box b{2, i};
        sum += middle(i) + scale(i) + (long)scale(1.0 * i) + b.area();
    }
    if (argc > 2)
        sum += crash(nullptr);
    std::printf("sum %ld\n", sum);
    return 0;
}
