/* For the hist trigger test: bump(a, b) is called 100 times with b = (i * i + argc) % 7, so
 * the histogram of b is computable from this source alone. */
long sink;

__attribute__((noinline)) long bump(long a, long b)
{
	sink += a * b;
	return sink;
}

int main(int argc, char **argv)
{
	(void)argv;
	for (long i = 0; i < 100; i++)
		bump(i, (i * i + argc) % 7);
	return (int)(sink & 0x7f);
}
