/* The scheduler's block hook (emu/linux/tasks.py): counts the code bytes of the running
 * task's quantum and watches the modelled clock against the next signal timer, calling
 * back into Python only when one of them runs out, so a multi-threaded guest pays ~1 ns a
 * block instead of a Python call. */
#include <stdint.h>

typedef void (*slow_fn)(void *uc, uint64_t addr, uint32_t size, void *ud);

struct pre_state {
	int64_t budget;           /* code bytes left in the quantum */
	const uint64_t *clock_fp; /* the clock's fixed-point accumulator, or NULL */
	uint64_t due_fp;          /* the next timer, in the same unit; ~0: none */
	slow_fn slow;             /* Python: switch tasks or fire timers */
};

void pre_on_block(void *uc, uint64_t addr, uint32_t size, struct pre_state *st)
{
	st->budget -= size;
	if (st->budget > 0 && (st->clock_fp == 0 || *st->clock_fp < st->due_fp))
		return;
	st->slow(uc, addr, size, st);
}
