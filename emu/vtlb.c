/*
 * The machine's virtual TLB fill (UC_HOOK_TLB_FILL under UC_TLB_VIRTUAL), built
 * by emu/vtlb.py with the host compiler at first use; vtlb.py has a Python fill
 * that gives the same answers.
 *
 * The guest has no MMU, so a page's physical address is its virtual address and
 * its permissions are its mapping's: a table of sorted, non-overlapping ranges
 * [start, end) with Unicorn perms that the Python Memory keeps current
 * (vtlb_assign on every map, unmap and protect). A page whose mapping lacks
 * the access (or that nothing maps) is not refused: refusing would end the run
 * with UC_ERR_EXCEPTION and only the page of the access. It is sent to a slot
 * of the fault window instead, an unmapped physical range where a bounded
 * invalid-memory hook sees the access with its exact page offset; the slot
 * remembers the page and whether it is mapped (read/write/fetch of an unmapped
 * or protected address, as Unicorn's own checks would report it).
 *
 * A page here is Unicorn's target page, the granule of a fill: 4 KiB on x86-64,
 * 1 KiB on arm64 (vaddr comes page-aligned; a slot is 4 KiB apart either way).
 */
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define VTLB_PAGE 0x1000ull
#define VTLB_SLOTS 64
#define VTLB_MAPPED 1ull        /* slot_page low bit: the denied page is mapped */

enum { UC_MEM_READ = 16, UC_MEM_WRITE = 17, UC_MEM_FETCH = 18 };
enum { PROT_R = 1, PROT_W = 2, PROT_X = 4 };

typedef struct {                /* uc_tlb_entry of unicorn.h */
	uint64_t paddr;
	uint32_t perms;
} uc_tlb_entry;

typedef struct {
	uint64_t start, end;
	uint64_t perms;
} vtlb_range;

typedef struct {
	vtlb_range *r;              /* sorted by start, non-overlapping */
	uint64_t n, cap;
	uint64_t window;            /* physical address of fault-window slot 0 */
	uint64_t slot_page[VTLB_SLOTS];   /* denied page | VTLB_MAPPED */
	uint64_t slots_used;
	uint64_t fills;             /* fills answered (every TLB miss) */
	uint64_t denials;           /* of which sent to the fault window */
} vtlb_state;

/* Index of the first range whose end is above addr (n if none). */
static uint64_t first_above(const vtlb_state *t, uint64_t addr)
{
	uint64_t lo = 0, hi = t->n;
	while (lo < hi) {
		uint64_t mid = lo + (hi - lo) / 2;
		if (t->r[mid].end <= addr)
			lo = mid + 1;
		else
			hi = mid;
	}
	return lo;
}

/* Perms of the page at addr, or -1 when nothing maps it. */
int vtlb_lookup(const vtlb_state *t, uint64_t addr)
{
	uint64_t i = first_above(t, addr);
	if (i < t->n && t->r[i].start <= addr)
		return (int)t->r[i].perms;
	return -1;
}

static int reserve(vtlb_state *t, uint64_t more)
{
	if (t->n + more <= t->cap)
		return 0;
	uint64_t cap = t->cap ? t->cap * 2 : 64;
	while (cap < t->n + more)
		cap *= 2;
	vtlb_range *r = realloc(t->r, cap * sizeof *r);
	if (!r)
		return -1;
	t->r = r;
	t->cap = cap;
	return 0;
}

/*
 * [start, end) now has perms (perms < 0: unmapped). Ranges are split where
 * they cross the bounds, the covered ones replaced by one; neighbours are not
 * merged (the table answers per page; Memory merges its regions itself).
 */
int vtlb_assign(vtlb_state *t, uint64_t start, uint64_t end, int perms)
{
	if (start >= end)
		return 0;
	if (reserve(t, 2))
		return -1;
	uint64_t i = first_above(t, start), j = i;
	vtlb_range head = {0, 0, 0}, tail = {0, 0, 0};
	while (j < t->n && t->r[j].start < end)
		j++;
	if (i < j && t->r[i].start < start)
		head = (vtlb_range){t->r[i].start, start, t->r[i].perms};
	if (i < j && t->r[j - 1].end > end)
		tail = (vtlb_range){end, t->r[j - 1].end, t->r[j - 1].perms};
	vtlb_range mid = {start, end, (uint64_t)perms};
	vtlb_range add[3];
	uint64_t k = 0;
	if (head.end)
		add[k++] = head;
	if (perms >= 0)
		add[k++] = mid;
	if (tail.end)
		add[k++] = tail;
	memmove(&t->r[i + k], &t->r[j], (t->n - j) * sizeof *t->r);
	memcpy(&t->r[i], add, k * sizeof *add);
	t->n = t->n - (j - i) + k;
	return 0;
}

void vtlb_clear(vtlb_state *t)
{
	t->n = 0;
}

void vtlb_free(vtlb_state *t)
{
	free(t->r);
	t->r = NULL;
	t->n = t->cap = 0;
}

static uint32_t need_of(int type)
{
	return type == UC_MEM_WRITE ? PROT_W : type == UC_MEM_FETCH ? PROT_X : PROT_R;
}

/* The fault-window slot for a denied page: the page's own if it has one. */
static uint64_t slot_of(vtlb_state *t, uint64_t tag)
{
	for (uint64_t s = 0; s < t->slots_used; s++)
		if (t->slot_page[s] == tag)
			return s;
	/* Past VTLB_SLOTS denials without a flush (each map, protect and fault flushes,
	 * vtlb.py) a slot is reused; a stale translation to it would name the newer page. */
	uint64_t s = t->slots_used < VTLB_SLOTS ? t->slots_used++ : t->denials % VTLB_SLOTS;
	t->slot_page[s] = tag;
	return s;
}

bool vtlb_fill(void *uc, uint64_t vaddr, int type, uc_tlb_entry *e, vtlb_state *t)
{
	(void)uc;
	int perms = vtlb_lookup(t, vaddr);
	uint32_t need = need_of(type);
	t->fills++;
	if (perms >= 0 && (perms & need)) {
		e->paddr = vaddr;
		e->perms = (uint32_t)perms;
		return true;
	}
	uint64_t s = slot_of(t, vaddr | (perms >= 0 ? VTLB_MAPPED : 0));
	t->denials++;
	e->paddr = t->window + s * VTLB_PAGE;
	e->perms = need;            /* only the denied access: others still fill the page */
	return true;
}
