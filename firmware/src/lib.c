/* lib.c - number printing and a minimal string/memory library shared by
 * both platform implementations.  Compiled with
 * -fno-tree-loop-distribute-patterns so gcc does not turn memset/memcpy
 * into calls to themselves. */
#include "platform.h"

void putnl(void)
{
	putch('\n');
}

void putu64(u64 v)
{
	char buf[24];
	int i = sizeof(buf) - 1;

	buf[i] = 0;
	do {
		buf[--i] = (char)('0' + v % 10);
		v /= 10;
	} while (v);
	putstr(&buf[i]);
}

void puts64(s64 v)
{
	if (v < 0) {
		putch('-');
		putu64(-(u64)v);
	} else {
		putu64((u64)v);
	}
}

void puthexw(u64 v, int width)
{
	static const char digits[] = "0123456789abcdef";
	char buf[20];
	int i = sizeof(buf) - 1;

	buf[i] = 0;
	do {
		buf[--i] = digits[v & 15];
		v >>= 4;
		width--;
	} while (v || width > 0);
	putstr(&buf[i]);
}

void puthex(u64 v)
{
	putstr("0x");
	puthexw(v, 1);
}

void putkv(const char *key, u64 v)
{
	putch(' ');
	putstr(key);
	putch('=');
	putu64(v);
}

void putkx(const char *key, u64 v)
{
	putch(' ');
	putstr(key);
	putch('=');
	puthex(v);
}

void *memset(void *d, int c, size_t n)
{
	u8 *p = d;

	while (n--)
		*p++ = (u8)c;
	return d;
}

void *memcpy(void *d, const void *s, size_t n)
{
	u8 *dp = d;
	const u8 *sp = s;

	while (n--)
		*dp++ = *sp++;
	return d;
}

void *memmove(void *d, const void *s, size_t n)
{
	u8 *dp = d;
	const u8 *sp = s;

	if (dp < sp) {
		while (n--)
			*dp++ = *sp++;
	} else {
		while (n--)
			dp[n] = sp[n];
	}
	return d;
}

int memcmp(const void *a, const void *b, size_t n)
{
	const u8 *x = a, *y = b;

	for (; n; n--, x++, y++)
		if (*x != *y)
			return *x - *y;
	return 0;
}

size_t strlen(const char *s)
{
	size_t n = 0;

	while (s[n])
		n++;
	return n;
}

int strcmp(const char *a, const char *b)
{
	while (*a && *a == *b) {
		a++;
		b++;
	}
	return (u8)*a - (u8)*b;
}

int strncmp(const char *a, const char *b, size_t n)
{
	for (; n; n--, a++, b++) {
		if (*a != *b)
			return (u8)*a - (u8)*b;
		if (!*a)
			return 0;
	}
	return 0;
}

u64 parse_u64(const char *s, u64 def)
{
	u64 v = 0;
	int base = 10, any = 0;

	if (!s)
		return def;
	if (s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
		base = 16;
		s += 2;
	}
	for (; *s; s++) {
		int d;

		if (*s >= '0' && *s <= '9')
			d = *s - '0';
		else if (base == 16 && *s >= 'a' && *s <= 'f')
			d = *s - 'a' + 10;
		else if (base == 16 && *s >= 'A' && *s <= 'F')
			d = *s - 'A' + 10;
		else
			return def;
		v = v * base + d;
		any = 1;
	}
	return any ? v : def;
}
