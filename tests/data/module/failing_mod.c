/* A module whose init fails: it must go GOING and be freed, never LIVE. */
int init_module(void)
{
	return -12;
}
