/*
 * platform.h - the tiny platform layer every freestanding firmware program is
 * written against.  Two implementations exist:
 *   plat_linux.c  Linux user mode: raw write(1, ...) / exit_group syscalls
 *   plat_bare.c   bare metal: PL011 UART / port 0x3f8 console, exit device
 * Programs must produce byte-identical output in both modes when run with no
 * arguments (bare metal always calls main(0, 0)).
 */
#ifndef FIRMWARE_PLATFORM_H
#define FIRMWARE_PLATFORM_H

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;
typedef signed char s8;
typedef short s16;
typedef int s32;
typedef long long s64;
typedef unsigned long size_t;
typedef long ssize_t;
typedef unsigned long uintptr_t;

#define NULL ((void *)0)
#define ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))

/*
 * Functions of interest (probe targets) use noipa: never inlined, never
 * cloned (no .isra/.constprop copies), and no interprocedural register
 * allocation, so arguments arrive in the ABI registers ($argN works) and
 * the result is in rax/x0 ($retval works).
 */
#define noinline __attribute__((noipa))
#define __used __attribute__((used))
#define __noreturn __attribute__((noreturn))

/* --- kernel-like probe blacklist ---------------------------------------
 * NOKPROBE_SYMBOL(fn): record fn's address as an 8-byte entry in section
 * "_kprobe_blacklist" (exactly like the kernel's __NOKPROBE_SYMBOL).  The
 * linker provides __start__kprobe_blacklist / __stop__kprobe_blacklist.
 */
#define NOKPROBE_SYMBOL(fname)                                               \
	static unsigned long __used                                          \
	    __attribute__((section("_kprobe_blacklist"), aligned(8)))        \
	    _kbl_addr_##fname = (unsigned long)(fname)

/* __kprobes: function placed in .kprobes.text (the whole section is
 * rejected by kprobes).  noinstr: .noinstr.text (also rejected). */
#define __kprobes __attribute__((noipa, section(".kprobes.text")))
#define noinstr __attribute__((noipa, section(".noinstr.text")))

/* --- console ------------------------------------------------------------ */
void putstr(const char *s);
void putch(char c);
void putnl(void);
void putu64(u64 v);             /* unsigned decimal */
void puts64(s64 v);             /* signed decimal */
void puthex(u64 v);             /* "0x" + lowercase hex, no padding */
void puthexw(u64 v, int width); /* lowercase hex, zero-padded, no "0x" */
void putkv(const char *key, u64 v); /* " key=<decimal>" */
void putkx(const char *key, u64 v); /* " key=0x<hex>" */
void flush_console(void);       /* no-op on bare metal */

__noreturn void sys_exit(int code);

/* --- small libc subset (lib.c) ----------------------------------------- */
void *memset(void *d, int c, size_t n);
void *memcpy(void *d, const void *s, size_t n);
void *memmove(void *d, const void *s, size_t n);
int memcmp(const void *a, const void *b, size_t n);
size_t strlen(const char *s);
int strcmp(const char *a, const char *b);
int strncmp(const char *a, const char *b, size_t n);
/* parse an unsigned decimal (or 0x hex) number; returns def on error */
u64 parse_u64(const char *s, u64 def);

/* Mode of the running image: 0 = Linux user, 1 = bare metal. Programs must
 * not let their output depend on it. */
extern const int platform_is_bare;

#endif
