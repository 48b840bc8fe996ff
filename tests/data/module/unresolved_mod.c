/* A module that needs a symbol its host does not have. */
extern long no_such_host_symbol(long);

long use_it(long v)
{
	return no_such_host_symbol(v);
}
