/* The host side of a kprobe trap in C (issue 14): a Unicorn INTR hook that owns the
 * breakpoints of armed probes with no Python handler. A hit counts, sends pc to the
 * out-of-line slot (or, boosted, lets the slot jump back by itself); the slot's step trap
 * sends pc to the next instruction. Cycle charges go straight into the clock's counter.
 * Anything this table does not own (or a state it does not model: reentry, the first
 * step of a boostable probe) goes to the Python hook, unchanged. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef int (*reg_fn)(void *uc, int regid, void *value);
typedef void (*intr_cb)(void *uc, uint32_t intno, void *user_data);

enum { KN_PROBE = 1, KN_SS = 2 };
enum { KN_BOOSTED = 1, KN_PY_SS = 2, KN_PRE = 4 };  /* slot jumps back; step trap goes to
                                                   * Python; a Python pre handler to call */
typedef int (*pre_cb)(uint32_t idx);        /* the Python pre handler of row idx: 1 = handled */

/* arm64 simulation (simulate-insn.c) from operands decoded at registration. aux packs the
 * register (bits 0-7), the condition (8-11), the tested bit (16-21) and flags (24-26). */
enum { SIM_NONE, SIM_B, SIM_BL, SIM_BCOND, SIM_CBZ, SIM_TBZ, SIM_ADR, SIM_BR };
#define AUX_REG(a) ((a) & 0xff)
#define AUX_COND(a) (((a) >> 8) & 0xf)
#define AUX_BIT(a) (((a) >> 16) & 0x3f)
#define AUX_X64 (1u << 24)                  /* cbz/cbnz on an X register */
#define AUX_NZ (1u << 25)                   /* cbnz/tbnz: taken when non-zero / set */
#define AUX_LINK (1u << 26)                 /* blr: x30 = addr + 4 */
#define ROW 8                               /* uint64 per row of kn_set_table */

struct kn_probe {
    uint64_t addr, slot, resume, ss_trap;
    uint64_t hits, nmissed;                 /* since Python last took them */
    uint32_t flags, sim;
    uint64_t imm;                           /* branch target / ADR(P) value */
    uint64_t aux;
};

struct kn_slotent { uint64_t addr; uint32_t kind, idx; };

struct kn_state {
    uint64_t *fp;                           /* the clock's counter, 1/256 cycles */
    uint64_t trap_fp, step_fp;              /* cost of one event, 1/256 cycles */
    uint64_t trap_cycles, step_cycles;      /* charged since Python last folded them */
    reg_fn reg_read, reg_write;
    intr_cb fallback;                       /* the machine's Python INTR hook */
    void *fallback_data;
    int32_t pc_reg;
    int32_t pc_adjust;                      /* x86: the CPU reports the byte after int3 */
    uint32_t brk_intno;
    int32_t current;                        /* probe being stepped, -1 if none */
    uint32_t mask;                          /* hash table size - 1 */
    uint32_t nprobes;
    struct kn_slotent *table;
    struct kn_probe *probes;
    uint64_t handled, deferred;
    uint32_t *stopping;                     /* nonzero: the run ended, defer everything */
    int32_t xregs[32];                      /* Unicorn ids of x0..x30 (arm64) */
    int32_t nzcv_reg;
    uint64_t detour_fp, detour_cycles;      /* optprobe detours: cost, charged since fold */
    pre_cb pre;
    uint64_t handler_fp, handler_cycles;
    uint32_t py_busy;                       /* a Python handler runs: every trap is reentry */
    uint32_t pad2;
};

static uint64_t get_x(struct kn_state *s, void *uc, uint32_t n)
{
    uint64_t v = 0;
    if (n != 31)
        s->reg_read(uc, s->xregs[n], &v);
    return v;
}

static void set_x(struct kn_state *s, void *uc, uint32_t n, uint64_t v)
{
    if (n != 31)
        s->reg_write(uc, s->xregs[n], &v);
}

static int condition_holds(uint32_t cond, uint64_t nzcv)
{
    int n = (nzcv >> 31) & 1, z = (nzcv >> 30) & 1, c = (nzcv >> 29) & 1, v = (nzcv >> 28) & 1;
    int base;
    switch (cond >> 1) {
    case 0: base = z; break;
    case 1: base = c; break;
    case 2: base = n; break;
    case 3: base = v; break;
    case 4: base = c && !z; break;
    case 5: base = n == v; break;
    case 6: base = !z && n == v; break;
    default: return 1;                      /* AL, NV */
    }
    return (cond & 1) ? !base : base;
}

/* The simulated instruction's effect; returns the next pc. */
static uint64_t simulate(struct kn_state *s, void *uc, const struct kn_probe *p)
{
    uint32_t aux = (uint32_t)p->aux, r = AUX_REG(aux);
    uint64_t next = p->addr + 4, v, nzcv = 0;
    switch (p->sim) {
    case SIM_BL:
        set_x(s, uc, 30, next);
        /* fall through */
    case SIM_B:
        return p->imm;
    case SIM_BCOND:
        s->reg_read(uc, s->nzcv_reg, &nzcv);
        return condition_holds(AUX_COND(aux), nzcv) ? p->imm : next;
    case SIM_CBZ:
        v = get_x(s, uc, r);
        if (!(aux & AUX_X64))
            v &= 0xffffffffu;
        return ((v != 0) == !!(aux & AUX_NZ)) ? p->imm : next;
    case SIM_TBZ:
        v = (get_x(s, uc, r) >> AUX_BIT(aux)) & 1;
        return (v == !!(aux & AUX_NZ)) ? p->imm : next;
    case SIM_ADR:
        set_x(s, uc, r, p->imm);
        return next;
    case SIM_BR:
        v = get_x(s, uc, r);                /* read before BLR writes x30 */
        if (aux & AUX_LINK)
            set_x(s, uc, 30, next);
        return v;
    }
    return next;
}

static void charge(struct kn_state *s, uint64_t n_fp, uint64_t *acc)
{
    uint64_t fp = *s->fp + n_fp;
    *s->fp = fp < *s->fp ? UINT64_MAX : fp;  /* saturate as the Python clock does */
    *acc += n_fp >> 8;
}

static struct kn_slotent *lookup(struct kn_state *s, uint64_t addr)
{
    if (!s->table)
        return NULL;
    uint32_t i = (uint32_t)((addr * 0x9E3779B97F4A7C15ull) >> 40) & s->mask;
    for (;;) {
        struct kn_slotent *e = &s->table[i];
        if (e->kind == 0)
            return NULL;
        if (e->addr == addr)
            return e;
        i = (i + 1) & s->mask;
    }
}

void kn_hook(void *uc, uint32_t intno, void *user_data)
{
    struct kn_state *s = user_data;
    if (intno == s->brk_intno && !(s->stopping && *s->stopping)) {
        uint64_t pc;
        s->reg_read(uc, s->pc_reg, &pc);
        uint64_t addr = pc + (int64_t)s->pc_adjust;
        struct kn_slotent *e = lookup(s, addr);
        if (e && e->kind == KN_PROBE && s->current < 0 && !s->py_busy) {
            struct kn_probe *p = &s->probes[e->idx];
            if (!(p->flags & KN_PRE))       /* else Python counts: its handler may look */
                p->hits++;
            charge(s, s->trap_fp, &s->trap_cycles);
            if (p->flags & KN_PRE) {
                charge(s, s->handler_fp, &s->handler_cycles);
                s->py_busy++;
                int done = s->pre(e->idx);  /* it set pc itself: no step */
                s->py_busy--;
                if (done) {
                    s->handled++;
                    return;
                }
            }
            if (p->sim != SIM_NONE) {       /* simulated: done right here, no slot */
                uint64_t next = simulate(s, uc, p);
                s->reg_write(uc, s->pc_reg, &next);
                s->handled++;
                return;
            }
            if (!(p->flags & KN_BOOSTED))
                s->current = (int32_t)e->idx;
            s->reg_write(uc, s->pc_reg, &p->slot);
            s->handled++;
            return;
        }
        if (e && e->kind == KN_SS && s->current == (int32_t)e->idx && !s->py_busy
                && !(s->probes[e->idx].flags & KN_PY_SS)) {
            struct kn_probe *p = &s->probes[e->idx];
            charge(s, s->step_fp, &s->step_cycles);
            s->current = -1;
            s->reg_write(uc, s->pc_reg, &p->resume);
            s->handled++;
            return;
        }
    }
    s->deferred++;
    s->fallback(uc, intno, s->fallback_data);
}

/* Replace the probe table: n probes, each (addr, slot, resume, ss_trap, flags, sim, imm,
 * aux). Counters
 * of the old table must have been taken first; `current` is reset. Returns 0 or -1. */
int kn_set_table(struct kn_state *s, const uint64_t *rows, uint32_t n)
{
    uint32_t size = 16;
    while (size < 4 * (n + 1))
        size <<= 1;
    struct kn_slotent *table = calloc(size, sizeof *table);
    struct kn_probe *probes = calloc(n ? n : 1, sizeof *probes);
    if (!table || !probes) {
        free(table);
        free(probes);
        return -1;
    }
    free(s->table);
    free(s->probes);
    s->table = table, s->probes = probes, s->mask = size - 1, s->nprobes = n;
    for (uint32_t k = 0; k < n; k++) {
        const uint64_t *r = rows + ROW * k;
        struct kn_probe *p = &probes[k];
        p->addr = r[0], p->slot = r[1], p->resume = r[2], p->ss_trap = r[3];
        p->flags = (uint32_t)r[4], p->sim = (uint32_t)r[5], p->imm = r[6], p->aux = r[7];
        uint64_t keys[2] = { p->addr, p->ss_trap };
        for (int j = 0; j < 2; j++) {
            if (j == 1 && ((p->flags & KN_BOOSTED) || p->sim != SIM_NONE))
                break;
            uint32_t i = (uint32_t)((keys[j] * 0x9E3779B97F4A7C15ull) >> 40) & s->mask;
            while (table[i].kind)
                i = (i + 1) & s->mask;
            table[i].addr = keys[j], table[i].kind = j ? KN_SS : KN_PROBE, table[i].idx = k;
        }
    }
    return 0;
}

void kn_free(struct kn_state *s)
{
    free(s->table);
    free(s->probes);
    s->table = NULL, s->probes = NULL, s->nprobes = 0, s->mask = 0;
}

/* The optprobe detour's host entry (a CODE hook on the detour's first byte): a probe with
 * no Python handler is counted here; otherwise the Python entry the hook had runs. */
typedef void (*code_cb)(void *uc, uint64_t addr, uint32_t size, void *user_data);

struct kn_detour {
    struct kn_state *s;
    code_cb orig;                           /* the Python host entry */
    void *orig_data;
    uint64_t hits, nmissed;                 /* since Python last took them */
    uint32_t native, pad;                   /* 0: call `orig` */
};

void kn_detour_hook(void *uc, uint64_t addr, uint32_t size, void *user_data)
{
    struct kn_detour *d = user_data;
    struct kn_state *s = d->s;
    if (!d->native) {
        d->orig(uc, addr, size, d->orig_data);
        return;
    }
    charge(s, s->detour_fp, &s->detour_cycles);
    if (s->current >= 0)                    /* a probe is being stepped: reentry */
        d->nmissed++;
    else
        d->hits++;
    s->handled++;
}
