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
enum { KN_BOOSTED = 1, KN_PY_SS = 2, KN_PRE = 4, KN_RET = 8 };
/* slot jumps back; step trap goes to Python; a Python pre handler to call; the entry of a
 * kretprobe with no Python handler (C hijacks, else the pre handler does) */
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
#define ROW 11                              /* uint64 per row of kn_set_table */

struct kn_tevent;

struct kn_probe {
    uint64_t addr, slot, resume, ss_trap;
    uint64_t hits, nmissed;                 /* since Python last took them */
    uint32_t flags, sim;
    uint64_t imm;                           /* branch target / ADR(P) value */
    uint64_t aux;
    int64_t rp;                             /* KN_RET: the kretprobe's row in kn_rethook */
    const uint64_t *tprog;                  /* a trace event's fetch program, or NULL */
    struct kn_tevent *tev;                  /* its commit in C (kn_trace_commit), or NULL */
};

struct kn_rethook;

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
    struct kn_rethook *rh;                  /* kretprobe state, NULL until one is registered */
    const struct kn_pyapi *py;              /* set: call `py_pre` through the C API */
    void *py_pre;                           /* the Python pre entry (a callable) */
    struct kn_uaccess *ua;                  /* the checked guest-memory path (kn_access_ok) */
    uint8_t *trace_buf;                     /* the record a fetch program built for Python */
    uint64_t trace_len, trace_cap;          /* its length (0: none built), its room */
    uint64_t traced;                        /* records built */
    int32_t ua_sp_reg, pad3;                /* sp, for $stackN */
    struct kn_tstate *ts;                   /* trace events committed in C, or NULL */
    void *py_fpre;                          /* the Python entry of ftrace sites' pre handlers */
    uint64_t hit_sp;                        /* sp at the hit, for that entry and py_fops */
    void *py_fops;                          /* the Python entry that runs a site's ops */
};

/* Python ran (a handler, a trap C handed over, a code hook): whatever it may have changed
 * of the trace layer (enables, filters, triggers, tracing_on, buffers, the task) is
 * checked again before C commits the next record (kn_trace_commit). */
static void kn_trace_stale(struct kn_state *s);

struct kn_uaccess;
static int eval_tprog(struct kn_state *s, void *uc, const uint64_t *prog);

/* The CPython calls C needs to run a Python callable straight from a hook (Unicorn runs
 * with the GIL released): cheaper than a ctypes callback, which converts its arguments
 * and result through ctypes' machinery. Addresses come from ctypes.pythonapi. */
struct kn_pyapi {
    int (*gil_ensure)(void);
    void (*gil_release)(int);
    void *(*call_one_arg)(void *callable, void *arg);
    void *(*long_from)(unsigned long v);
    long (*long_as)(void *o);
    void (*decref)(void *o);
    void (*write_unraisable)(void *o);
};

/* fn(arg), a Python callable, through the C API: its result, 1 if it failed. */
static int call_py(const struct kn_pyapi *py, void *fn, uint32_t idx)
{
    int gil = py->gil_ensure();
    int done = 1;
    void *arg = py->long_from(idx);
    void *res = arg ? py->call_one_arg(fn, arg) : NULL;
    if (res) {
        done = py->long_as(res) != 0;
        py->decref(res);
    } else {
        py->write_unraisable(fn);           /* the entries catch their own: not reached */
    }
    if (arg)
        py->decref(arg);
    py->gil_release(gil);
    return done;
}

/* pre(row) in Python: its result, 1 (the hit is complete) if it failed. */
static int call_pre(struct kn_state *s, uint32_t idx)
{
    kn_trace_stale(s);
    if (!s->py)
        return s->pre(idx);
    return call_py(s->py, s->py_pre, idx);
}

struct kn_tevent;
static int kn_trace_commit(struct kn_state *s, struct kn_tevent *ev, const uint64_t *words,
                           uint32_t nwords);

static int kn_rethook_entry(struct kn_state *s, void *uc, int64_t row);
static int kn_rethook_return(struct kn_state *s, void *uc, uint64_t addr);

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
        if (s->rh && s->current < 0 && !s->py_busy && kn_rethook_return(s, uc, addr)) {
            s->handled++;
            return;
        }
        struct kn_slotent *e = lookup(s, addr);
        if (e && e->kind == KN_PROBE && s->current < 0 && !s->py_busy) {
            struct kn_probe *p = &s->probes[e->idx];
            int ret_native = (p->flags & KN_RET) && kn_rethook_entry(s, uc, p->rp);
            if (!(p->flags & KN_PRE) || ret_native)     /* else Python counts: its handler */
                p->hits++;                              /* may look */
            charge(s, s->trap_fp, &s->trap_cycles);
            if (p->flags & KN_PRE) {
                charge(s, s->handler_fp, &s->handler_cycles);
                int done = 0;
                if (!ret_native) {
                    s->trace_len = 0;
                    int built = p->tprog && eval_tprog(s, uc, p->tprog) == 0;
                    s->traced += built;
                    if (built && p->tev && kn_trace_commit(s, p->tev, &p->addr, 1)) {
                        p->hits++;
                    } else {
                        s->py_busy++;
                        done = call_pre(s, e->idx);  /* it set pc itself: no step */
                        s->py_busy--;
                    }
                }
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
    kn_trace_stale(s);
    s->fallback(uc, intno, s->fallback_data);
}

/* Replace the probe table: n probes, each (addr, slot, resume, ss_trap, flags, sim, imm,
 * aux, rp, tprog, tev). Counters
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
        p->rp = (int64_t)r[8];
        p->tprog = (const uint64_t *)(uintptr_t)r[9];
        p->tev = (struct kn_tevent *)(uintptr_t)r[10];
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
        kn_trace_stale(s);
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

/* Return probes (probes/kretprobes.py; rethook) for kretprobes with no Python handler.
 * While C holds the running task's instance LIFO (`py_owns` == 0), it takes the entry of
 * such a kretprobe (an instance from the pool, the return address hijacked, stale frames
 * dropped, the push) and the trampoline (the returning chain found by sp, counted, pool
 * refilled, pc and arm64 lr restored). Any case it does not model -- another task runs,
 * an instance of a kretprobe with a Python handler (or none) to drop or return, a bad
 * stack, a trampoline with no pending instance -- leaves everything untouched and goes
 * to Python, which takes the LIFO back (probes/native/rethook.py). */
struct kn_ri {
    uint64_t ret_addr, fp, stack;           /* as KretprobeInstance */
    int64_t rp;                             /* row in `rps`; -1: Python's (obj is its index) */
    int64_t obj;
};

/* one kretprobe C serves: its counters and free count; `py`: a Python return handler,
 * which C calls (rh_py_ret) for each of its returns */
struct kn_rp {
    uint64_t hits, nmissed, ndropped, nfree, py;
    const uint64_t *tprog;                  /* a kretprobe event's fetch program, or NULL */
    struct kn_tevent *tev;                  /* its commit in C */
    uint64_t func;                          /* __probe_func: the probed function */
};

struct uc_region { uint64_t begin, end; uint32_t perms; };  /* uc_mem_region: end inclusive */
typedef int (*regions_fn)(void *uc, struct uc_region **regions, uint32_t *count);
typedef int (*free_fn)(void *mem);
typedef int (*mem_fn)(void *uc, uint64_t addr, void *bytes, uint64_t size);
enum { UC_PROT_READ = 1, UC_PROT_WRITE = 2, UC_PROT_EXEC = 4 };

/* The host-side facts kn_access_ok checks against (uaccess.py's Memory and TASK_SIZE). */
struct kn_uaccess {
    uint64_t task_size;                     /* TASK_SIZE: access_ok's limit */
    regions_fn mem_regions;
    free_fn uc_free;
    mem_fn mem_read, mem_write;
};

struct kn_rethook {
    struct kn_state *s;
    uint64_t trampoline;
    struct kn_ri *lifo;
    uint64_t n, cap;
    struct kn_rp *rps;
    uint64_t nrps;
    uint64_t ndropped, frame_warnings;      /* since Python last took them */
    uint64_t lifo_tid;                      /* whose LIFO `lifo` is (Python's note) */
    uint32_t py_owns, x86;                  /* x86: lr is the word at sp, a DETOUR charge */
    int32_t sp_reg, fp_reg, lr_reg, pad;
    struct kn_uaccess ua;                   /* x86: the return-address slot is checked */
    code_cb orig;                           /* x86: the trampoline's Python host entry */
    void *orig_data;
    uint64_t handled, deferred;
    void *py_ret;                           /* the Python entry of return handlers */
    struct kn_ri cur;                       /* the instance whose handler runs */
    uint64_t correct;                       /* the returning chain's real return address */
    uint64_t resume;                        /* set by a handler: go there (a BPF stub) */
    uint64_t chain_len;                     /* instances of the returning chain */
};

/* The native side of the one checked path (emu/uaccess.py _check): [addr, addr+n) lies
 * below TASK_SIZE and in guest pages with `prot`. Unicorn's mappings carry the same
 * permissions as emu.memory's regions (Memory.map/protect set both). Returns 1 if the
 * access is allowed, 0 if uaccess would raise UserFault; an executable page is -1 (a write
 * there must drop translated code: Python does it). */
int kn_access_ok(struct kn_uaccess *h, void *uc, uint64_t addr, uint64_t n, uint32_t prot)
{
    uint64_t end = addr + n;
    if (end < addr || end > h->task_size)
        return 0;
    struct uc_region *r = NULL;
    uint32_t count = 0;
    if (h->mem_regions(uc, &r, &count) != 0)
        return 0;
    int ok = 1, exec = 0;
    while (ok && addr < end) {
        uint32_t i = 0;
        while (i < count && !(r[i].begin <= addr && addr <= r[i].end))
            i++;
        if (i == count || !(r[i].perms & prot)) {
            ok = 0;
        } else {
            exec |= (prot & UC_PROT_WRITE) && (r[i].perms & UC_PROT_EXEC);
            addr = r[i].end + 1 ? r[i].end + 1 : end;
        }
    }
    h->uc_free(r);
    return ok && exec ? -1 : ok;
}

/* arch_uretprobe_is_alive, by context: 0 CALL, 1 CHAIN_CALL, 2 RET (probes.arch.common). */
enum { RP_CALL, RP_CHAIN_CALL, RP_RET };

static int rp_alive(const struct kn_rethook *h, const struct kn_ri *ri, int ctx, uint64_t sp)
{
    if (h->x86)
        return ctx == RP_CALL ? sp < ri->stack : sp <= ri->stack;
    return ctx == RP_CHAIN_CALL ? sp <= ri->stack : sp < ri->stack;
}

static int rp_ours(const struct kn_rethook *h, const struct kn_ri *ri)
{
    return ri->rp >= 0 && (uint64_t)ri->rp < h->nrps;
}

static void rp_drop(struct kn_rethook *h, const struct kn_ri *ri)
{
    struct kn_rp *rp = &h->rps[ri->rp];
    h->ndropped++;
    rp->ndropped++;
    rp->nfree++;
}

/* May C work on the LIFO now? Python takes it back at every task switch (the LIFO is
 * per task) and whenever its own code needs it. */
static int rethook_ready(struct kn_state *s)
{
    struct kn_rethook *h = s->rh;
    return h && !h->py_owns;
}

/* The return address at the entry (arch_prepare_kretprobe's read); 0 refused, -1 Python. */
static int read_ret(struct kn_state *s, void *uc, uint64_t sp, uint64_t *ret)
{
    struct kn_rethook *h = s->rh;
    if (!h->x86) {
        *ret = get_x(s, uc, 30);
        return 1;
    }
    int ok = kn_access_ok(&h->ua, uc, sp, 8, UC_PROT_READ);
    if (ok != 1)
        return ok;
    ok = kn_access_ok(&h->ua, uc, sp, 8, UC_PROT_WRITE);  /* put_user's check first */
    if (ok != 1)
        return ok;
    return h->ua.mem_read(uc, sp, ret, 8) == 0 ? 1 : -1;
}

static int lifo_reserve(struct kn_rethook *h, uint64_t n)
{
    if (n <= h->cap)
        return 1;
    uint64_t cap = h->cap ? 2 * h->cap : 64;
    while (cap < n)
        cap *= 2;
    struct kn_ri *l = realloc(h->lifo, cap * sizeof *l);
    if (!l)
        return 0;
    h->lifo = l, h->cap = cap;
    return 1;
}

/* Python's LIFO comes in: room for n records. Returns the array or NULL. */
struct kn_ri *kn_rethook_reserve(struct kn_rethook *h, uint64_t n)
{
    return lifo_reserve(h, n) ? h->lifo : NULL;
}

void kn_rethook_free(struct kn_rethook *h)
{
    free(h->lifo);
    h->lifo = NULL, h->cap = h->n = 0;
}

/* pre_handler_kretprobe for kretprobe row `row`; 1 if done here, 0 to call Python. */
static int kn_rethook_entry(struct kn_state *s, void *uc, int64_t row)
{
    struct kn_rethook *h = s->rh;
    if (!rethook_ready(s) || row < 0 || (uint64_t)row >= h->nrps)
        return 0;
    struct kn_rp *rp = &h->rps[row];
    if (!rp->nfree) {
        rp->nmissed++;
        h->handled++;
        return 1;
    }
    uint64_t sp, ret;
    s->reg_read(uc, h->sp_reg, &sp);
    int ok = read_ret(s, uc, sp, &ret);
    if (ok < 0)
        return 0;
    if (ok == 0) {                          /* a hostile sp: no hijack, as uretprobes */
        rp->nmissed++;
        h->handled++;
        return 1;
    }
    int chained = ret == h->trampoline;
    int ctx = chained ? RP_CHAIN_CALL : RP_CALL;
    uint64_t keep = h->n;                   /* cleanup_return_instances, dry run first */
    for (; keep && !rp_alive(h, &h->lifo[keep - 1], ctx, sp); keep--)
        if (!rp_ours(h, &h->lifo[keep - 1]))
            return 0;                       /* Python drops its own instances */
    if (!lifo_reserve(h, keep + 1))
        return 0;
    if (h->x86) {
        if (h->ua.mem_write(uc, sp, &h->trampoline, 8) != 0)
            return 0;
    } else {
        set_x(s, uc, 30, h->trampoline);
    }
    uint64_t fp = h->x86 ? sp : get_x(s, uc, 29);
    while (h->n > keep)
        rp_drop(h, &h->lifo[--h->n]);
    h->handled++;
    if (chained && h->n == 0) {             /* the guest put the trampoline there itself */
        rp->nmissed++;
        return 1;
    }
    rp->nfree--;
    h->lifo[h->n++] = (struct kn_ri){ ret, fp, sp, row, -1 };
    return 1;
}

/* The index of the bottom of the chain under `top` (the first record from the top that
 * holds a real return address), or -1. */
static int64_t chain_start(const struct kn_rethook *h, uint64_t top)
{
    int64_t i = (int64_t)top - 1;
    while (i >= 0 && h->lifo[i].ret_addr == h->trampoline)
        i--;
    return i;
}

#define RET_CHAIN_MAX 64                    /* longer chains with handlers go to Python */

/* A kretprobe event's record (kretprobe_dispatcher) fetched and committed in C: 1 done. */
static int ret_event(struct kn_state *s, void *uc, struct kn_rp *rp, const struct kn_ri *ri)
{
    uint64_t words[2] = { rp->func, ri->ret_addr };
    s->trace_len = 0;
    if (eval_tprog(s, uc, rp->tprog) != 0)
        return 0;
    s->traced++;
    return kn_trace_commit(s, rp->tev, words, 2);
}

/* __kretprobe_trampoline_handler at `addr`; 1 if done here, 0 to call Python. */
static int kn_rethook_return(struct kn_state *s, void *uc, uint64_t addr)
{
    struct kn_rethook *h = s->rh;
    if (addr != h->trampoline || !rethook_ready(s))
        return 0;
    uint64_t sp, top = h->n;
    int64_t j;
    s->reg_read(uc, h->sp_reg, &sp);
    for (;;) {                              /* the walk of _returning_chain, dry run */
        j = chain_start(h, top);
        if (j < 0)
            return 0;                       /* no pending instance: Python faults */
        for (uint64_t k = (uint64_t)j; k < top; k++)
            if (!rp_ours(h, &h->lifo[k]))
                return 0;
        if (j == 0 || rp_alive(h, &h->lifo[j - 1], RP_RET, sp))
            break;
        top = (uint64_t)j;                  /* frames left by a longjmp: dropped */
    }
    struct kn_ri chain[RET_CHAIN_MAX];      /* handlers may hand the LIFO to Python */
    uint64_t len = top - (uint64_t)j;
    int py = 0;
    for (uint64_t k = (uint64_t)j; k < top; k++)
        py |= h->rps[h->lifo[k].rp].py != 0;
    if (py && (!h->py_ret || !s->py || len > RET_CHAIN_MAX))
        return 0;                           /* a handler C cannot call: Python's */
    while (h->n > top)
        rp_drop(h, &h->lifo[--h->n]);
    uint64_t frame = h->x86 ? sp - 8 : get_x(s, uc, 29);
    uint64_t correct = h->lifo[j].ret_addr;
    if (py)
        memcpy(chain, &h->lifo[j], len * sizeof *chain);
    const struct kn_ri *base = py ? chain : &h->lifo[j];
    struct kn_rp *rps = h->rps;
    h->n = (uint64_t)j;                     /* the chain leaves the LIFO before handlers run */
    h->correct = correct;
    h->chain_len = len;
    int warned = 0;
    for (int64_t k = (int64_t)len - 1; k >= 0 && h->rps == rps; k--) {
        const struct kn_ri *ri = &base[k];
        struct kn_rp *rp = &rps[ri->rp];
        if (!warned && ri->fp != frame) {   /* WARN_ON_ONCE: no more handlers */
            h->frame_warnings++;
            warned = 1;
        }
        if (rp->py && !warned) {            /* the handler, with the reused pt_regs view */
            charge(s, s->handler_fp, &s->handler_cycles);
            if (rp->tprog && rp->tev && ret_event(s, uc, rp, ri)) {
                rp->hits++;                 /* kretprobe_dispatcher, all in C */
                rp->nfree++;
                continue;
            }
            h->cur = *ri;
            kn_trace_stale(s);
            s->py_busy++;
            call_py(s->py, h->py_ret, (uint32_t)ri->rp);
            s->py_busy--;
            if (h->rps != rps)              /* a handler changed the kretprobes: their */
                break;                      /* rows are new, the rest goes uncounted */
        }
        rp->hits++;
        rp->nfree++;
    }
    uint64_t to = h->resume ? h->resume : correct;   /* the stub restores lr itself */
    h->resume = 0;
    if (!h->x86 && to == correct)
        set_x(s, uc, 30, correct);
    s->reg_write(uc, s->pc_reg, &to);
    if (h->x86)
        charge(s, s->detour_fp, &s->detour_cycles);
    else
        charge(s, s->trap_fp, &s->trap_cycles);
    h->handled++;
    return 1;
}

/* x86: the code hook on the trampoline (rethook has no trap), in place of Python's. */
void kn_tramp_hook(void *uc, uint64_t addr, uint32_t size, void *user_data)
{
    struct kn_rethook *h = user_data;
    struct kn_state *s = h->s;
    if (!(s->stopping && *s->stopping) && s->current < 0 && !s->py_busy
            && kn_rethook_return(s, uc, addr))
        return;
    h->deferred++;
    kn_trace_stale(s);
    h->orig(uc, addr, size, h->orig_data);
}

/* The ftrace caller (probes/ftrace.py Ftrace._ftrace_caller) for sites whose only ops is
 * the kprobes' one, serving a kprobe with no Python handler: charge the detour, count the
 * hit (or, while a probe is being stepped, the miss). One record per trampoline host
 * entry: x86's shared trampoline finds its site from the call's return address (`back`
 * = 5: site = [sp] - 5, read through kn_access_ok as uaccess reads it; an unreadable
 * stack goes to Python, which reports the fault); arm64's per-site stubs are keyed by pc. */
enum { FS_PYTHON, FS_COUNT, FS_PRE, FS_OPS };  /* kn_fsite.native: Python's caller, C
                                           * counts, C calls the probe's Python pre handler
                                           * (py_fpre), C calls the site's ops (py_fops) */
struct kn_fsite { uint64_t key, hits, nmissed; uint32_t native, used; uint64_t idx; };

struct kn_ftrace {
    struct kn_state *s;
    code_cb orig;                           /* the Python host entry */
    void *orig_data;
    int32_t sp_reg;
    uint32_t mask;                          /* sites: hash table size - 1 */
    uint64_t back;
    struct kn_fsite *sites;
    uint64_t handled, deferred;
};

static struct kn_fsite *fsite(struct kn_ftrace *f, uint64_t key)
{
    if (!f->sites)
        return NULL;
    uint32_t i = (uint32_t)((key * 0x9E3779B97F4A7C15ull) >> 40) & f->mask;
    for (;; i = (i + 1) & f->mask) {
        struct kn_fsite *e = &f->sites[i];
        if (!e->used)
            return NULL;
        if (e->key == key)
            return e;
    }
}

static int user_read(struct kn_uaccess *ua, void *uc, uint64_t addr, void *out, uint64_t n);

void kn_ftrace_hook(void *uc, uint64_t addr, uint32_t size, void *user_data)
{
    struct kn_ftrace *f = user_data;
    struct kn_state *s = f->s;
    uint64_t key = addr;
    if (f->back) {
        uint64_t sp;
        s->reg_read(uc, f->sp_reg, &sp);
        if (!s->ua || !user_read(s->ua, uc, sp, &key, 8))
            key = 0;                        /* Python's path reports the fault */
        key -= f->back;
    }
    struct kn_fsite *e = f->back && !key ? NULL : fsite(f, key);
    if (e && e->native == FS_PRE && !(s->py && s->py_fpre))
        e = NULL;
    if (e && e->native == FS_OPS && s->py && s->py_fops && s->current < 0 && !s->py_busy
            && !(s->stopping && *s->stopping)) {
        charge(s, s->detour_fp, &s->detour_cycles);     /* _ftrace_caller, from C */
        s->reg_read(uc, f->sp_reg, &s->hit_sp);
        kn_trace_stale(s);
        s->py_busy++;
        call_py(s->py, s->py_fops, (uint32_t)e->idx);
        s->py_busy--;
        f->handled++;
        return;
    }
    if (e && e->native == FS_OPS)
        e = NULL;
    if (e && e->native && !s->py_busy && !(s->stopping && *s->stopping)) {
        charge(s, s->detour_fp, &s->detour_cycles);
        if (s->current >= 0) {
            e->nmissed++;
        } else if (e->native == FS_PRE) {   /* kprobe_ftrace_handler's call, from C */
            charge(s, s->handler_fp, &s->handler_cycles);
            s->reg_read(uc, f->sp_reg, &s->hit_sp);
            kn_trace_stale(s);
            s->py_busy++;
            call_py(s->py, s->py_fpre, (uint32_t)e->idx);
            s->py_busy--;
        } else {
            e->hits++;
        }
        f->handled++;
        return;
    }
    f->deferred++;
    kn_trace_stale(s);
    f->orig(uc, addr, size, f->orig_data);
}

/* Size the site table for n sites (a power of two, at least 4n); 0 or -1. */
struct kn_fsite *kn_ftrace_table(uint32_t n, uint32_t *mask)
{
    uint32_t size = 16;
    while (size < 4 * (n + 1))
        size <<= 1;
    *mask = size - 1;
    return calloc(size, sizeof(struct kn_fsite));
}

void kn_ftrace_add(struct kn_ftrace *f, uint64_t key, uint32_t native, uint64_t idx)
{
    uint32_t i = (uint32_t)((key * 0x9E3779B97F4A7C15ull) >> 40) & f->mask;
    while (f->sites[i].used && f->sites[i].key != key)
        i = (i + 1) & f->mask;
    f->sites[i].key = key, f->sites[i].used = 1, f->sites[i].native = native;
    f->sites[i].idx = idx;
}

void kn_free_ptr(void *p)
{
    free(p);
}

/* A kprobe event's fetch arguments (probes/trace/trace_probe.py FetchArg.fetch and
 * trace_kprobe.store_trace_args), compiled at sync into a program of two-word ops: the
 * first word packs the opcode (bits 0-7), a size (8-15), the record offset (16-31) and a
 * bitfield (width 32-39, shift 40-47, container bits 48-55); the second is the operand.
 * C builds the record's fixed part and strings in `trace_buf`, reading guest memory
 * through kn_access_ok as uaccess does, and Python commits it (header, clock, filters,
 * triggers and the ring buffer stay Python's). A case C does not model (a plain $stackN
 * that faults: Python raises) leaves no record and Python fetches everything itself. */
enum { TP_END, TP_REG, TP_SP, TP_IMM, TP_STACK, TP_DEREF, TP_ADD, TP_ST_VAL, TP_ST_MEM,
       TP_ST_STR, TP_FIXED };
enum { STACK_FAULTS, STACK_PLAIN, STACK_ZERO };  /* TP_STACK on a fault: faulted, Python, 0 */
#define TP_OP(w) ((w) & 0xff)
#define TP_SIZE(w) (((w) >> 8) & 0xff)
#define TP_OFF(w) (((w) >> 16) & 0xffff)
#define TP_BFW(w) (((w) >> 32) & 0xff)
#define TP_BFO(w) (((w) >> 40) & 0xff)
#define TP_BFC(w) (((w) >> 48) & 0xff)
#define MAX_STRING 4095                     /* MAX_STRING_SIZE - 1 */

static int user_read(struct kn_uaccess *ua, void *uc, uint64_t addr, void *out, uint64_t n)
{
    return kn_access_ok(ua, uc, addr, n, UC_PROT_READ) != 0
        && ua->mem_read(uc, addr, out, n) == 0;
}

static int trace_room(struct kn_state *s, uint64_t n)
{
    if (n <= s->trace_cap)
        return 1;
    uint64_t cap = s->trace_cap ? s->trace_cap : 256;
    while (cap < n)
        cap *= 2;
    uint8_t *b = realloc(s->trace_buf, cap);
    if (!b)
        return 0;
    s->trace_buf = b, s->trace_cap = cap;
    return 1;
}

static uint64_t fit(uint64_t w, uint64_t v)
{
    uint32_t size = TP_SIZE(w), c = TP_BFC(w);
    if (size < 8)
        v &= (1ull << (8 * size)) - 1;
    if (c) {                                /* Bitfield.extract */
        uint32_t width = TP_BFW(w), shift = TP_BFO(w);
        uint64_t mask = c >= 64 ? ~0ull : (1ull << c) - 1;
        v = (v << (c - width - shift)) & mask;
        v >>= c - width;
    }
    return v;
}

/* strncpy_from_user into the record: 1 copied, 0 faulted, -1 no memory. */
static int copy_string(struct kn_state *s, void *uc, uint64_t addr)
{
    uint8_t chunk[4096];
    uint64_t got = 0;
    while (got < MAX_STRING) {
        uint64_t cur = addr + got, n = MAX_STRING - got, room = 4096 - (cur & 4095);
        if (n > room)
            n = room;
        if (kn_access_ok(s->ua, uc, cur, 1, UC_PROT_READ) == 0 || s->ua->mem_read(uc, cur, chunk, n))
            return 0;
        uint8_t *nul = memchr(chunk, 0, n);
        uint64_t take = nul ? (uint64_t)(nul - chunk) : n;
        if (!trace_room(s, s->trace_len + take + 1))
            return -1;
        memcpy(s->trace_buf + s->trace_len, chunk, take);
        s->trace_len += take;
        got += take;
        if (nul)
            break;
    }
    s->trace_buf[s->trace_len++] = 0;
    return 1;
}

/* Run a fetch program into trace_buf: 0 built (trace_len set), -1 Python fetches. */
static int eval_tprog(struct kn_state *s, void *uc, const uint64_t *prog)
{
    const uint64_t *op = prog;
    uint64_t v = 0, sp = 0;
    int faulted = 0, have_sp = 0;
    if (!s->ua || TP_OP(op[0]) != TP_FIXED || !trace_room(s, op[1]))
        return -1;
    memset(s->trace_buf, 0, op[1]);
    s->trace_len = op[1];
    for (op += 2; TP_OP(op[0]) != TP_END; op += 2) {
        uint64_t w = op[0], a = op[1];
        switch (TP_OP(w)) {
        case TP_REG:
            s->reg_read(uc, (int)a, &v), faulted = 0;
            break;
        case TP_IMM:
            v = a, faulted = 0;
            break;
        case TP_SP:
        case TP_STACK:
            if (!have_sp)
                s->reg_read(uc, s->ua_sp_reg, &sp), have_sp = 1;
            faulted = 0;
            if (TP_OP(w) == TP_SP) {
                v = sp;
            } else if (!user_read(s->ua, uc, sp + 8 * a, &v, 8)) {
                if (TP_SIZE(w) == STACK_PLAIN) {
                    s->trace_len = 0;
                    return -1;
                }
                v = 0, faulted = TP_SIZE(w) == STACK_FAULTS;
            }
            break;
        case TP_DEREF:
            if (!faulted && !user_read(s->ua, uc, v + a, &v, 8))
                faulted = 1;
            break;
        case TP_ADD:
            v += a;
            break;
        case TP_ST_VAL:
        case TP_ST_MEM: {
            uint64_t x = 0;
            if (TP_OP(w) == TP_ST_VAL)
                x = fit(w, v);
            else if (!faulted && user_read(s->ua, uc, v, &x, TP_SIZE(w)))
                x = fit(w, x);
            memcpy(s->trace_buf + TP_OFF(w), &x, TP_SIZE(w));
            break;
        }
        case TP_ST_STR: {
            uint32_t start = (uint32_t)s->trace_len, loc = start;
            int r = faulted ? 0 : copy_string(s, uc, v);
            if (r < 0) {
                s->trace_len = 0;
                return -1;
            }
            if (r > 0)
                loc |= (uint32_t)(s->trace_len - start) << 16;
            else
                s->trace_len = start;
            memcpy(s->trace_buf + TP_OFF(w), &loc, 4);
            break;
        }
        default:
            s->trace_len = 0;
            return -1;
        }
    }
    return 0;
}

/* The ring buffer's per-CPU ring (probes/trace/ring_buffer.py CpuBuffer, which C and
 * Python write alike): entries of u32 total, u32 len, u64 ts, data; total 0 marks the
 * ring's unused end. The budget (`size`, record_cost per record) decides what is kept.
 * A reader waiting for `wake_at` bytes (buffer_percent) is a Python callable, `wake`. */
struct kn_rb {
    uint8_t *buf;
    uint64_t cap, head, tail, fill, last;   /* ring bytes; oldest, next, in use, newest */
    uint64_t size, used, nentries;          /* budget, its use, records */
    uint64_t overrun, dropped, written, read;
    uint32_t overwrite, woken;              /* woken: the waiter was called, has not read */
    uint64_t wake_at;
    void *wake;                             /* wake(cpu), or NULL: no waiter */
};

#define RB_HEAD 16
#define RB_EVNT_HDR_SIZE 4

static uint64_t rb_cost(uint64_t n) { return RB_EVNT_HDR_SIZE + (n + 3) / 4 * 4; }
static uint64_t rb_need(uint64_t n) { return RB_HEAD + (n + 7) / 8 * 8; }

static void rb_pop(struct kn_rb *rb)
{
    uint64_t pos = rb->head;
    uint32_t total, n;
    memcpy(&total, rb->buf + pos, 4);
    if (total == 0) {                       /* the unused end: the oldest is at 0 */
        rb->fill -= rb->cap - pos;
        pos = 0;
        memcpy(&total, rb->buf, 4);
    }
    memcpy(&n, rb->buf + pos + 4, 4);
    rb->head = (pos + total) % rb->cap;
    rb->fill -= total;
    rb->used -= rb_cost(n);
    if (--rb->nentries == 0)
        rb->head = rb->tail = rb->fill = 0;
}

/* 1 written, 0 refused (counted as dropped), -1 the ring's bytes ran out: Python grows it
 * and writes (the evictions made here are the ones it would make). */
static int kn_rb_write(struct kn_rb *rb, uint64_t ts, const uint8_t *data, uint64_t n)
{
    uint64_t cost = rb_cost(n), need = rb_need(n);
    if (cost > rb->size) {
        rb->dropped++;
        return 0;
    }
    while (rb->used + cost > rb->size) {
        if (!rb->overwrite) {
            rb->dropped++;
            return 0;
        }
        rb_pop(rb);
        rb->overrun++;
    }
    uint64_t gap = rb->cap - rb->tail < need ? rb->cap - rb->tail : 0;
    if (rb->fill + gap + need > rb->cap)
        return -1;
    if (gap) {
        memset(rb->buf + rb->tail, 0, 4);
        rb->fill += gap;
        rb->tail = 0;
    }
    uint64_t pos = rb->tail;
    uint32_t head[2] = { (uint32_t)need, (uint32_t)n };
    memcpy(rb->buf + pos, head, 8);
    memcpy(rb->buf + pos + 8, &ts, 8);
    memcpy(rb->buf + pos + RB_HEAD, data, n);
    rb->tail = (pos + need) % rb->cap;
    rb->fill += need;
    rb->last = pos;
    rb->nentries++;
    rb->used += cost;
    rb->written++;
    return 1;
}

/* rb_wakeups for a full-waiter (ring_buffer.py RingBuffer.full_hit): once, until the reader
 * has read, when another record of this cost would pass the mark. */
static int kn_rb_full_hit(struct kn_rb *rb, uint64_t n)
{
    if (!rb->wake || rb->woken || rb->used + rb_cost(n) <= rb->wake_at)
        return 0;
    rb->woken = 1;
    return 1;
}

/* Kprobe events committed in C (trace_kprobe.py kprobe_dispatcher, tracefs commit): when
 * the event's only consumer is the ring buffer -- enabled, no BPF program, no trigger,
 * not soft-disabled, no on_commit subscriber, a filter this evaluator expresses or none, the
 * clock without a cycle model's pending block -- C stamps the header, filters, reads the
 * clock and writes the record. Python decides that (`ok`) whenever it may have changed:
 * `valid` is cleared each time Python runs and the next commit asks it again. */
struct kn_tstate {
    uint32_t valid, pad;
    int32_t pid, cpu;                       /* the running task, the CPU it runs on */
    uint64_t freq_hz;                       /* cycles -> ns (Clock.monotonic_ns) */
    uint64_t committed, revalidations;
    void *revalidate;                       /* the Python entry that sets `valid` */
    const uint64_t *const *cm_cur;          /* the cycle model's current block (cm_state.cur:
                                             * its addr, then size at +24), or NULL */
};

struct kn_tevent {
    uint32_t ok, type;                      /* C commits; trace_entry.type (the event id) */
    uint32_t flags, tracing_on;             /* trace_entry flags | preempt_count << 8 */
    uint64_t nhit;                          /* hits C took (since Python folded them) */
    struct kn_rb **rbs;                     /* the live buffer's CPUs */
    uint64_t nrbs;
    const uint64_t *filter;                 /* the compiled filter, or NULL */
    /* With the cycle model the clock reads fp minus the running block's cost after the
     * probed instruction (Clock.now, pending_fp): Python's path learns it for one block
     * and C reuses it while that block is the one running the probe. */
    uint64_t pend_entry, pend_addr, pend_size, pend_fp;
    uint32_t pend_valid, pad;
};

static void kn_trace_stale(struct kn_state *s)
{
    if (s->ts)
        s->ts->valid = 0;
}

/* A filter (trace_events_filter.py native_filter) in postfix, two words an op: the first
 * packs the opcode (0-7), the field's size (8-15), signedness (16), the comparison
 * (24-31) and the field's offset (32-47); the second is the constant. */
enum { F_END, F_NUM, F_CPU, F_AND, F_OR, F_NOT };
enum { CMP_EQ, CMP_NE, CMP_LT, CMP_LE, CMP_GT, CMP_GE, CMP_AND };
#define FILTER_DEPTH 64

static int compare(uint32_t cmp, int sgn, uint64_t a, uint64_t b)
{
    int64_t x = (int64_t)a, y = (int64_t)b;
    switch (cmp) {
    case CMP_EQ: return a == b;
    case CMP_NE: return a != b;
    case CMP_LT: return sgn ? x < y : a < b;
    case CMP_LE: return sgn ? x <= y : a <= b;
    case CMP_GT: return sgn ? x > y : a > b;
    case CMP_GE: return sgn ? x >= y : a >= b;
    default: return (a & b) != 0;
    }
}

static int filter_match(const uint64_t *op, const uint8_t *rec, uint64_t len, int32_t cpu)
{
    uint8_t st[FILTER_DEPTH];
    int sp = 0;
    for (; (op[0] & 0xff) != F_END; op += 2) {
        uint64_t w = op[0], v = 0;
        uint32_t size = (w >> 8) & 0xff, off = (w >> 32) & 0xffff;
        int sgn = (w >> 16) & 1;
        switch (w & 0xff) {
        case F_NUM:
            if (off + size > len)
                return -1;
            memcpy(&v, rec + off, size);
            if (sgn && size < 8 && (v >> (8 * size - 1)) & 1)
                v |= ~0ull << (8 * size);
            st[sp++] = (uint8_t)compare((w >> 24) & 0xff, sgn, v, op[1]);
            break;
        case F_CPU:
            st[sp++] = (uint8_t)compare((w >> 24) & 0xff, 0, (uint64_t)(uint32_t)cpu, op[1]);
            break;
        case F_AND: sp--; st[sp - 1] = st[sp - 1] && st[sp]; break;
        case F_OR: sp--; st[sp - 1] = st[sp - 1] || st[sp]; break;
        case F_NOT: st[sp - 1] = !st[sp - 1]; break;
        default: return -1;
        }
        if (sp >= FILTER_DEPTH)
            return -1;
    }
    return sp == 1 ? st[0] : -1;
}

/* The record trace_buf holds (fields and strings from eval_tprog) committed, the probe's
 * own fields (`words`: __probe_ip, or __probe_func and __probe_ret_ip) after the header:
 * 1 done (counted; written unless tracing is off, the filter refuses it or the buffer
 * drops it), 0 Python commits it (nothing changed but evictions it would make too). */
static int kn_trace_commit(struct kn_state *s, struct kn_tevent *ev, const uint64_t *words,
                           uint32_t nwords)
{
    struct kn_tstate *t = s->ts;
    struct kn_rb *woke = NULL;
    if (!t)
        return 0;
    if (!t->valid) {
        if (!t->revalidate || !s->py)
            return 0;
        t->revalidations++;
        s->py_busy++;
        call_py(s->py, t->revalidate, 0);
        s->py_busy--;
        if (!t->valid)
            return 0;
    }
    if (!ev->ok || t->cpu < 0 || (uint64_t)t->cpu >= ev->nrbs || s->trace_len < 8 + 8 * nwords)
        return 0;
    uint8_t *b = s->trace_buf;
    uint16_t type = (uint16_t)ev->type;
    memcpy(b, &type, 2);
    b[2] = (uint8_t)ev->flags, b[3] = (uint8_t)(ev->flags >> 8);
    memcpy(b + 4, &t->pid, 4);
    memcpy(b + 8, words, 8 * nwords);
    if (ev->tracing_on) {
        if (ev->filter) {
            int m = filter_match(ev->filter, b, s->trace_len, t->cpu);
            if (m < 0)
                return 0;
            if (!m)
                goto counted;
        }
        uint64_t fp = *s->fp;
        if (t->cm_cur) {
            const uint64_t *cur = *t->cm_cur;
            uint64_t addr = cur ? cur[0] : 0, size = cur ? (uint32_t)cur[3] : 0;
            if (!ev->pend_valid || ev->pend_entry != (uintptr_t)cur || ev->pend_addr != addr
                    || ev->pend_size != size)
                return 0;                   /* Python reads this block's share, once */
            if (fp != UINT64_MAX)
                fp -= ev->pend_fp;
        }
        unsigned __int128 ns = (unsigned __int128)(fp >> 8) * 1000000000u;
        uint64_t ts = (uint64_t)(ns / t->freq_hz);
        int r = kn_rb_write(ev->rbs[t->cpu], ts, b, s->trace_len);
        if (r < 0)
            return 0;
        t->committed += (uint64_t)r;
        if (r > 0 && kn_rb_full_hit(ev->rbs[t->cpu], s->trace_len))
            woke = ev->rbs[t->cpu];
    }
counted:
    ev->nhit++;
    s->trace_len = 0;
    if (woke && s->py) {                    /* the reader drains: after the counts it settles */
        s->py_busy++;
        call_py(s->py, woke->wake, (uint32_t)t->cpu);
        s->py_busy--;
    }
    return 1;
}
