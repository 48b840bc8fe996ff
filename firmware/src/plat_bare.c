/* plat_bare.c - bare-metal platform (no OS).
 *   arm64:  console = PL011 data register 0x09000000 (32-bit store per byte)
 *           exit    = 32-bit store of the exit code to 0x09100000
 *   x86-64: console = outb to port 0x3f8 (one byte per out)
 *           exit    = outl of the exit code to port 0xf4; hlt = exit 0
 * Output is unbuffered: one device write per character. */
#include "platform.h"

const int platform_is_bare = 1;

#if defined(__aarch64__)
#define UART_DR ((volatile u32 *)0x09000000UL)
#define EXIT_DEV ((volatile u32 *)0x09100000UL)

void putch(char c)
{
	*UART_DR = (u8)c;
}

__noreturn void sys_exit(int code)
{
	*EXIT_DEV = (u32)code;
	for (;;)
		asm volatile("wfi");
}
#elif defined(__x86_64__)
#define COM1 0x3f8
#define EXIT_PORT 0xf4

void putch(char c)
{
	asm volatile("outb %%al, %%dx" : : "a"(c), "d"((u16)COM1));
}

__noreturn void sys_exit(int code)
{
	asm volatile("outl %%eax, %%dx" : : "a"((u32)code), "d"((u16)EXIT_PORT));
	for (;;)
		asm volatile("hlt");
}
#else
#error unsupported architecture
#endif

void putstr(const char *s)
{
	while (*s)
		putch(*s++);
}

void flush_console(void)
{
}
