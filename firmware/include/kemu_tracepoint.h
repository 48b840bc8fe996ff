/*
 * kemu_tracepoint.h - static tracepoints for kprobe-emu guests, laid out as the
 * kernel lays them out (include/linux/tracepoint.h, jump_label.h):
 *
 *   TRACE_EVENT(name, TP_PROTO(int a, long b), TP_ARGS(a, b),
 *               TP_printk("a=%d b=%ld", a, b));
 *   ...
 *   trace_name(x, y);      // one 4-byte NOP (arm64) / 5-byte NOP (x86-64)
 *
 * Each trace_name() site is a static branch on __tracepoint_name.key with a
 * 16-byte `struct jump_entry {s32 code; s32 target; long key;}` in __jump_table
 * (every field relative to its own address, key bit 0 = branch).  The emulator
 * flips the NOP to a branch (B / JMP rel32) while a probe is registered; the
 * branch reaches the out-of-line call __traceiter_name(args...), whose body
 * traps into the emulator (`brk #KEMU_TP_BRK_IMM` / int3), which calls the
 * registered probe functions in priority order and returns.
 *
 * Sections:  __tracepoints (struct kemu_tracepoint), __tracepoints_ptrs (s32
 * self-relative pointers to them), __bpf_raw_tp_map (struct bpf_raw_event_map,
 * 32-byte aligned), __jump_table.
 * At most 6 arguments (the ones both ABIs pass in registers), each at most 8
 * bytes.  Define KEMU_CREATE_TRACE_POINTS in exactly one translation unit
 * before including the header (the others only get the trace_name() calls).
 *
 * TRACE_EVENT_WRITABLE(name, proto, args, print, size) also sets the raw
 * tracepoint's writable_size: its first argument points to a buffer that
 * raw_tracepoint.w BPF programs may write.
 *
 * Define TRACE_SYSTEM (the event group, default kemu) before the include.
 * Build: add -I firmware/include; no other flag is needed (-O1 or higher so
 * the static-branch asm sees constants).
 */
#ifndef KEMU_TRACEPOINT_H
#define KEMU_TRACEPOINT_H

#ifndef TRACE_SYSTEM
#define TRACE_SYSTEM kemu       /* the events' group unless the program names one */
#endif

#define KEMU_TP_BRK_IMM 0x5e0   /* arm64 trap immediate of __traceiter_*  */

struct kemu_static_key {
	int enabled;            /* atomic_t enabled */
	int __pad;
	unsigned long type;     /* bit 0: initial value (0 = false) */
};

struct kemu_tracepoint {
	const char *name;
	struct kemu_static_key key;
	void *iterator;         /* __traceiter_name */
	unsigned long num_args;
	const char *proto;      /* "TP_PROTO(int a, long b)" */
	const char *print;      /* "TP_printk(\"a=%d\", a)" */
	const char *system;     /* TRACE_SYSTEM: the event's group */
};

struct kemu_bpf_raw_event_map {
	struct kemu_tracepoint *tp;
	void *bpf_func;
	unsigned int num_args;
	unsigned int writable_size;
} __attribute__((aligned(32)));

#define TP_PROTO(...) __VA_ARGS__
#define TP_ARGS(...) __VA_ARGS__

#define __KEMU_NARGS_(_1, _2, _3, _4, _5, _6, _7, N, ...) N
#define __KEMU_NARGS(...) __KEMU_NARGS_(__VA_ARGS__, 7, 6, 5, 4, 3, 2, 1, 0)
#define __KEMU_STR(x) #x
#define __KEMU_XSTR(x) __KEMU_STR(x)

/* arch_static_branch: the NOP form, jump_entry key = &key + branch. */
#if defined(__aarch64__)
static inline __attribute__((always_inline)) int
kemu_arch_static_branch(struct kemu_static_key *key, int branch)
{
	asm goto("1:	nop\n\t"
		 ".pushsection __jump_table, \"aw\"\n\t"
		 ".balign 8\n\t"
		 ".long 1b - ., %l[l_yes] - .\n\t"
		 ".quad %c0 - .\n\t"
		 ".popsection\n\t"
		 : : "Si"(&((char *)key)[branch]) : : l_yes);
	return 0;
l_yes:
	return 1;
}
#define __KEMU_ITER_BODY "brk #" __KEMU_XSTR(KEMU_TP_BRK_IMM) "\n\tret\n\t"
#define __KEMU_FUNC_TYPE "%function"
#elif defined(__x86_64__)
static inline __attribute__((always_inline)) int
kemu_arch_static_branch(struct kemu_static_key *key, int branch)
{
	asm goto("1:	.byte 0x0f, 0x1f, 0x44, 0x00, 0x00\n\t"
		 ".pushsection __jump_table, \"aw\"\n\t"
		 ".balign 8\n\t"
		 ".long 1b - ., %l[l_yes] - .\n\t"
		 ".quad %c0 + %c1 - .\n\t"
		 ".popsection\n\t"
		 : : "i"(key), "i"(branch) : : l_yes);
	return 0;
l_yes:
	return 1;
}
#define __KEMU_ITER_BODY "int3\n\tret\n\t"
#define __KEMU_FUNC_TYPE "@function"
#else
#error "kemu_tracepoint.h: arm64 or x86-64 only"
#endif

#define kemu_static_branch_unlikely(k) __builtin_expect(kemu_arch_static_branch((k), 0), 0)

#define __DECLARE_TRACE(_name, _proto, _args) \
	extern struct kemu_tracepoint __tracepoint_##_name; \
	void __traceiter_##_name(_proto); \
	static inline __attribute__((always_inline)) void trace_##_name(_proto) \
	{ \
		if (kemu_static_branch_unlikely(&__tracepoint_##_name.key)) \
			__traceiter_##_name(_args); \
	}

#ifdef KEMU_CREATE_TRACE_POINTS
#define __DEFINE_TRACE(_name, _proto, _args, _print, _size) \
	asm(".pushsection .text.__traceiter_" #_name ", \"ax\"\n\t" \
	    ".globl __traceiter_" #_name "\n\t" \
	    ".type __traceiter_" #_name ", " __KEMU_FUNC_TYPE "\n\t" \
	    ".balign 16\n" \
	    "__traceiter_" #_name ":\n\t" __KEMU_ITER_BODY \
	    ".size __traceiter_" #_name ", . - __traceiter_" #_name "\n\t" \
	    ".popsection\n\t" \
	    ".pushsection __tracepoints_ptrs, \"a\"\n\t" \
	    ".balign 4\n\t" \
	    ".long __tracepoint_" #_name " - .\n\t" \
	    ".popsection\n\t"); \
	struct kemu_tracepoint __tracepoint_##_name \
	    __attribute__((used, section("__tracepoints"), aligned(32))) = { \
		.name = #_name, \
		.iterator = (void *)__traceiter_##_name, \
		.num_args = __KEMU_NARGS(_args), \
		.proto = #_proto, \
		.print = #_print, \
		.system = __KEMU_XSTR(TRACE_SYSTEM), \
	}; \
	static struct kemu_bpf_raw_event_map __bpf_trace_tp_map_##_name \
	    __attribute__((used, section("__bpf_raw_tp_map"))) = { \
		.tp = &__tracepoint_##_name, \
		.bpf_func = (void *)__traceiter_##_name, \
		.num_args = __KEMU_NARGS(_args), \
		.writable_size = (_size), \
	};
#else
#define __DEFINE_TRACE(_name, _proto, _args, _print, _size)
#endif

#define TRACE_EVENT(_name, _proto, _args, _print) \
	__DECLARE_TRACE(_name, PARAMS(_proto), PARAMS(_args)) \
	__DEFINE_TRACE(_name, PARAMS(_proto), PARAMS(_args), _print, 0)
#define PARAMS(...) __VA_ARGS__

/*
 * A tracepoint whose first argument points to a buffer of _size bytes that
 * raw_tracepoint.w programs may write (the kernel's DECLARE_TRACE_WRITABLE,
 * with a print format so that it is an event too).  _size must be the size of
 * what the first argument points to, as the kernel insists at build time.
 */
#define __KEMU_FIRST_(a, ...) a
#define __KEMU_FIRST(...) __KEMU_FIRST_(__VA_ARGS__)
#define TRACE_EVENT_WRITABLE(_name, _proto, _args, _print, _size) \
	static inline __attribute__((unused)) void __kemu_check_buffer_##_name(_proto) \
	{ \
		_Static_assert((_size) == sizeof(*__KEMU_FIRST(_args)), \
			       "writable size must be the size of what arg 1 points to"); \
	} \
	__DECLARE_TRACE(_name, PARAMS(_proto), PARAMS(_args)) \
	__DEFINE_TRACE(_name, PARAMS(_proto), PARAMS(_args), _print, _size)
#define DECLARE_TRACE_WRITABLE(_name, _proto, _args, _size) \
	TRACE_EVENT_WRITABLE(_name, PARAMS(_proto), PARAMS(_args), TP_printk(""), _size)

#endif /* KEMU_TRACEPOINT_H */
