/* A glibc program for BPF tests: a function on the error-injection list
 * (ALLOW_ERROR_INJECTION, as include/asm-generic/error-injection.h emits it),
 * one that is not, a three-deep call chain with frame pointers for stacks, and a
 * function taking a string. Built -static -no-pie -fno-omit-frame-pointer. */
#include <stdio.h>

struct error_injection_entry {
	unsigned long addr;
	int etype;
};

#define EI_ETYPE_ERRNO 1
#define ALLOW_ERROR_INJECTION(fname, _etype)					\
	static struct error_injection_entry __attribute__((__used__,		\
		section("_error_injection_whitelist"), aligned(8)))		\
		_eil_addr_##fname = { (unsigned long)fname, EI_ETYPE_##_etype }

#define noinline __attribute__((noinline, noclone))

volatile int denied_uid = 1000;

noinline int check_perm(int uid)
{
	return uid == denied_uid ? -13 : 0;
}
ALLOW_ERROR_INJECTION(check_perm, ERRNO);

noinline int not_listed(int x)
{
	return x + denied_uid;
}

noinline int leaf(int n)
{
	return n * 3 + denied_uid;
}

noinline int middle(int n)
{
	return leaf(n + 1) + 1;
}

noinline int outer(int n)
{
	return middle(n + 1) + 1;
}

noinline int lookup(const char *path, int mode)
{
	int h = mode;

	while (*path)
		h = h * 31 + *path++;
	return h & 0xffff;
}

int main(void)
{
	int uid;

	for (uid = 999; uid <= 1001; uid++)
		printf("check_perm(%d) = %d\n", uid, check_perm(uid));
	printf("not_listed(1) = %d\n", not_listed(1));
	printf("outer(1) = %d\n", outer(1));
	printf("outer(2) = %d\n", outer(2));
	printf("lookup = %d\n", lookup("/etc/hostname", 4));
	printf("lookup = %d\n", lookup("/proc/version", 2));
	return 0;
}
