/* A call chain for the stack walks of bpf_get_stack / bpf_get_stackid
 * (tests/test_bpf_get_stack_engines.py): main -> outer -> middle -> leaf, middle calling
 * leaf from two sites. Built with -fno-omit-frame-pointer: every caller keeps a frame
 * record, as a kernel built for frame-pointer unwinding does. */
#define noinline __attribute__((noinline, noclone))

volatile long sink;

noinline long leaf(long x)
{
	sink = x;
	return x * 3 + 1;
}

noinline long middle(long x)
{
	long a = leaf(x);

	return a + 2 * leaf(a + 1);
}

noinline long outer(long x)
{
	return middle(x) + 1;
}

int main(void)
{
	long s = 0;

	for (long i = 0; i < 3; i++)
		s += outer(i);
	sink = s;
	return 0;
}
