/* A guest module (ET_REL, built -c): calls back into its host (host_scale) and hooks
 * itself into the host's mod_hook at init. */
extern long (*volatile mod_hook)(long, long);
extern long host_scale(long v);

static long calls;
long mod_last;

__attribute__((noinline)) long mod_mix(long a, long b)
{
	return host_scale(a) + b;
}

long mod_work(long a, long b)
{
	calls++;
	mod_last = mod_mix(a, b);
	return mod_last;
}

int init_module(void)
{
	mod_hook = mod_work;
	return 0;
}

void cleanup_module(void)
{
	mod_hook = 0;
}

/* A table of addresses (absolute 64-bit relocations), as __jump_table or __mcount_loc. */
static long (*const mod_entries[])(long, long) __attribute__((section("mod_table"), used)) = {
	mod_work, mod_mix,
};
