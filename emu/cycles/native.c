/*
 * The cycle model's per-block accounting as a native Unicorn BLOCK hook
 * (built by emu/cycles/native.py with gcc at first use; a Python fallback
 * does the same work ~100x slower).
 *
 * One open-addressing table maps (block start, size) to the block's static
 * cost in 1/256 cycles. A block not in the table calls back into Python once
 * (cm_state.miss), which computes the cost and inserts it with cm_insert().
 * The hot path only adds to the clock and counts executions per entry;
 * instruction counts and the per-reason shares are summed from the entries
 * when asked (cm_totals). Everything is integer arithmetic.
 *
 * The clock saturates at UINT64_MAX instead of wrapping (a guest sleep can
 * bring it there): time never runs backwards and a cycle limit still fires.
 *
 * Without the cycle model, cm_on_block_bytes is the machine's default work
 * clock: each executed block adds its size in bytes times byte_cost.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define CM_COND 1u              /* block ends in a conditional branch */
#define CM_SEEN 2u              /* predictor: the branch has run before */
#define CM_TAKEN 4u             /* predictor: its last direction */
#define CM_LAYER 8u             /* code in pages a layer owns (emu/owners.py), booked apart */

typedef struct {
	uint64_t addr;              /* 0: empty slot */
	uint64_t cost;              /* 1/256 cycles */
	uint64_t count;             /* executions */
	uint32_t size;
	uint32_t n;                 /* instructions */
	uint32_t flags;
	uint32_t pad;
} cm_entry;

typedef void (*cm_miss_fn)(void *uc, uint64_t addr, uint32_t size, void *ud);
typedef int (*cm_stop_fn)(void *uc);

typedef struct {
	uint64_t fp;                /* the clock: total cycles, 1/256 fixed point */
	uint64_t prev_end;          /* fall-through of the previous block; 0: none */
	uint64_t taken_cost;        /* branch_taken, 1/256 cycles */
	uint64_t mispredict_cost;   /* branch_mispredict, 1/256 cycles; 0: no predictor */
	uint64_t taken;             /* taken branches */
	uint64_t mispredicts;
	uint64_t misses;            /* blocks costed (calls to miss) */
	uint64_t unknown;           /* blocks run without a cost (miss failed) */
	uint64_t count;             /* entries in the table */
	uint64_t mask;              /* table size - 1 (a power of two) */
	uint64_t gone[4];           /* cm_totals of entries dropped by cm_invalidate */
	cm_entry *table;
	cm_entry *cur;              /* entry of the block being executed */
	cm_miss_fn miss;
	uint64_t limit_fp;          /* stop the run once fp reaches this; 0: no limit */
	cm_stop_fn stop;            /* uc_emu_stop */
	uint64_t limit_hit;         /* set when the limit stopped the run */
	uint64_t byte_cost;         /* work clock: 1/256 cycles per executed code byte */
	uint64_t bytes;             /* work clock: code bytes executed */
	uint64_t loop_cost;         /* loop_back: a taken branch back into the same small block */
	uint64_t loop_max;          /* loop_buffer: most instructions such a loop may have */
	uint64_t loops;             /* taken branches charged as loop-backs */
} cm_state;

static inline uint64_t cm_sat_add(uint64_t a, uint64_t b)
{
	uint64_t r;
	return __builtin_add_overflow(a, b, &r) ? UINT64_MAX : r;
}

static inline uint64_t cm_hash(uint64_t addr, uint32_t size)
{
	return ((addr ^ ((uint64_t)size << 40)) * 0x9E3779B97F4A7C15ull) >> 20;
}

static inline cm_entry *cm_find(cm_state *st, uint64_t addr, uint32_t size)
{
	uint64_t i = cm_hash(addr, size) & st->mask;
	for (;;) {
		cm_entry *e = &st->table[i];
		if (e->addr == addr && e->size == size)
			return e;
		if (e->addr == 0)
			return NULL;
		i = (i + 1) & st->mask;
	}
}

static void cm_put(cm_entry *table, uint64_t mask, const cm_entry *src)
{
	uint64_t i = cm_hash(src->addr, src->size) & mask;
	while (table[i].addr != 0 && !(table[i].addr == src->addr && table[i].size == src->size))
		i = (i + 1) & mask;
	table[i] = *src;
}

static void cm_add_totals(const cm_entry *e, uint64_t *out)
{
	out[0] += e->count * e->cost;                           /* code, 1/256 cycles */
	out[1] += (e->flags & CM_LAYER) ? e->count * e->cost : 0;   /* layer code */
	out[2] += e->count * e->n;                              /* instructions */
	out[3] += e->count;                                     /* blocks */
}

/* Copy the table into one of new_size slots, dropping entries overlapping [lo, hi). */
static int cm_rebuild(cm_state *st, uint64_t new_size, uint64_t lo, uint64_t hi)
{
	cm_entry *old = st->table, *nt = calloc(new_size, sizeof(cm_entry));
	uint64_t n = 0, cur_addr = st->cur ? st->cur->addr : 0, cur_size = st->cur ? st->cur->size : 0;
	if (!nt)
		return -1;
	for (uint64_t i = 0; old && i <= st->mask; i++) {
		cm_entry *e = &old[i];
		if (e->addr == 0)
			continue;
		if (e->addr < hi && e->addr + e->size > lo) {
			cm_add_totals(e, st->gone);
			continue;
		}
		cm_put(nt, new_size - 1, e);
		n++;
	}
	st->table = nt;
	st->mask = new_size - 1;
	st->count = n;
	st->cur = cur_addr ? cm_find(st, cur_addr, (uint32_t)cur_size) : NULL;
	free(old);
	return 0;
}

int cm_init(cm_state *st, uint64_t size)
{
	st->table = NULL;
	st->cur = NULL;
	st->mask = 0;
	return cm_rebuild(st, size, 0, 0);
}

void cm_free(cm_state *st)
{
	free(st->table);
	st->table = NULL;
	st->cur = NULL;
}

int cm_insert(cm_state *st, uint64_t addr, uint32_t size, uint64_t cost, uint32_t n, uint32_t flags)
{
	cm_entry e = {addr, cost, 0, size, n, flags, 0}, *old;
	if ((st->count + 1) * 2 > st->mask + 1 && cm_rebuild(st, (st->mask + 1) * 2, 0, 0))
		return -1;
	old = cm_find(st, addr, size);
	if (old) {
		old->cost = cost;
		old->n = n;
		old->flags = flags;
		return 0;
	}
	st->count++;
	cm_put(st->table, st->mask, &e);
	return 0;
}

/* Forget every block overlapping [lo, hi): its bytes changed. */
int cm_invalidate(cm_state *st, uint64_t lo, uint64_t hi)
{
	return cm_rebuild(st, st->mask + 1, lo, hi);
}

/* out[0..3]: code (1/256 cycles), layer code (1/256 cycles), instructions, blocks. */
void cm_totals(const cm_state *st, uint64_t *out)
{
	memcpy(out, st->gone, sizeof(st->gone));
	for (uint64_t i = 0; st->table && i <= st->mask; i++)
		if (st->table[i].addr)
			cm_add_totals(&st->table[i], out);
}

/* 1-bit predictor on the previous block's conditional branch. */
static uint64_t cm_predict(cm_state *st, uint64_t addr)
{
	cm_entry *p = st->cur;
	uint32_t taken, f;
	if (!p || !(p->flags & CM_COND))
		return 0;
	taken = st->prev_end != addr ? CM_TAKEN : 0;
	f = p->flags;
	p->flags = (f & ~CM_TAKEN) | CM_SEEN | taken;
	if ((f & CM_SEEN) && (f & CM_TAKEN) == taken)
		return 0;
	st->mispredicts++;
	return st->mispredict_cost;
}

/* Look the block up (costing it first if new). */
static inline cm_entry *cm_enter(cm_state *st, void *uc, uint64_t addr, uint32_t size)
{
	cm_entry *e = cm_find(st, addr, size);
	if (__builtin_expect(!e, 0)) {
		st->misses++;
		st->miss(uc, addr, size, st);
		e = cm_find(st, addr, size);
		if (!e)
			st->unknown++;
	}
	return e;
}

static inline void cm_on_block_tail(cm_state *st, void *uc, cm_entry *e, uint64_t addr, uint32_t size)
{
	uint64_t fp = st->fp;
	if (st->prev_end != addr) {
		if (e && st->cur == e && e->n <= st->loop_max) {
			fp = cm_sat_add(fp, st->loop_cost);
			st->loops++;
		} else {
			fp = cm_sat_add(fp, st->taken_cost);
			st->taken++;
		}
	}
	st->prev_end = addr + size;
	st->cur = e;
	if (__builtin_expect(e != NULL, 1)) {
		fp = cm_sat_add(fp, e->cost);
		e->count++;
	}
	st->fp = fp;
	if (__builtin_expect(st->limit_fp != 0 && fp >= st->limit_fp, 0) && !st->limit_hit) {
		st->limit_hit = 1;
		st->stop(uc);
	}
}

/* The BLOCK hook: charge the block about to run (and a taken branch into it). */
void cm_on_block(void *uc, uint64_t addr, uint32_t size, void *ud)
{
	cm_state *st = ud;
	cm_on_block_tail(st, uc, cm_enter(st, uc, addr, size), addr, size);
}

/* The same with the 1-bit branch predictor (profiles with mispredict_rate 1). */
void cm_on_block_bp(void *uc, uint64_t addr, uint32_t size, void *ud)
{
	cm_state *st = ud;
	cm_entry *e = cm_enter(st, uc, addr, size);
	st->fp = cm_sat_add(st->fp, cm_predict(st, addr));
	cm_on_block_tail(st, uc, e, addr, size);
}

/* The work clock's BLOCK hook: time moves with the code executed, no table, no callback. */
void cm_on_block_bytes(void *uc, uint64_t addr, uint32_t size, void *ud)
{
	cm_state *st = ud;
	(void)uc;
	(void)addr;
	st->bytes += size;
	st->fp = cm_sat_add(st->fp, size * st->byte_cost);
}

/*
 * Guest-visible hardware randomness (x86 RDRAND/RDSEED): Unicorn draws it from a
 * host-seeded generator in qemu_guest_getrandom, with no hook. emu/arch/hwrng.py
 * redirects that function here, to a splitmix64 stream per machine seeded by --seed;
 * the machine selects its stream before each run.
 */
typedef struct {
	uint64_t state;
	uint64_t draws;             /* 8-byte words handed out */
} cm_rng;

static cm_rng cm_rng_none;      /* runs of machines that never selected a stream */
static cm_rng *cm_rng_current = &cm_rng_none;

void cm_rng_select(cm_rng *r)
{
	cm_rng_current = r ? r : &cm_rng_none;
}

static uint64_t cm_splitmix64(uint64_t *s)
{
	uint64_t z = (*s += 0x9E3779B97F4A7C15ull);
	z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
	z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
	return z ^ (z >> 31);
}

int cm_guest_getrandom(void *buf, size_t len)
{
	unsigned char *p = buf;
	while (len) {
		uint64_t v = cm_splitmix64(&cm_rng_current->state);
		size_t n = len < 8 ? len : 8;
		memcpy(p, &v, n);
		p += n;
		len -= n;
		cm_rng_current->draws++;
	}
	return 0;
}
