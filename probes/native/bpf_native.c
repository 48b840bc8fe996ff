/* The BPF hash map family's storage and the helper trampoline's host entry in C (issue 17).
 *
 * A hash map is preallocated as kernel/bpf/hashtab.c preallocates its elements: a pool of
 * max_entries slots (key, then one value per CPU), a bucket array of chains, a free list,
 * and a doubly linked list in insertion order (get_next_key walks it; LRU maps move an
 * element to its end when it is used and evict its head when full). Python's map API
 * (probes/bpf/maps.py) calls these functions and reads keys and values in the pool
 * directly, so Python, C and a program see the same bytes.
 *
 * bn_helper_hook is the UC_HOOK_CODE callback of one helper trampoline (jit_guest.py):
 * for a call from a JITed image run from a guest stub of any kind (an optprobe thunk, a
 * kprobe, kretprobe, ftrace or tracepoint stub) it reads r1-r5 from the arch's argument
 * registers, runs map_update_elem / map_delete_elem on a hash map served here (per-CPU
 * ones on the running CPU, a word a cpu_listener keeps) or on an array map's guest
 * window, or get_prandom_u32 / get_smp_processor_id, or current's get_current_pid_tgid /
 * _uid_gid / _task / _comm (into the BPF stack, from words Python keeps: bn_jit.task_valid),
 * and writes r0, with no Python. Anything else goes to the Python host entry it replaced,
 * unchanged. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define NIL 0xffffffffu
enum { BN_LRU = 1, BN_LRU_PERCPU = 2 };             /* bn_htab.lru: 0, or the LRU kind */
enum { E2BIG_ = 7, ENOENT_ = 2, EEXIST_ = 17, EINVAL_ = 22 };
enum { BPF_ANY_ = 0, BPF_NOEXIST_ = 1, BPF_EXIST_ = 2, BPF_F_LOCK_ = 4 };

struct bn_htab {
    uint32_t key_size, value_size, vstride, ncpus;  /* vstride: value_size rounded to 8 */
    uint32_t max_entries, nbuckets, count, lru;     /* lru: 0, BN_LRU, BN_LRU_PERCPU */
    uint32_t head, tail, free_head, pad;            /* insertion order; free slots */
    uint32_t *bucket, *chain, *onext, *oprev;       /* chain: bucket (or free) successor */
    uint8_t *keys, *values;                         /* slot s: keys + s * key_size,
                                                       values + (s * ncpus + cpu) * vstride */
};

static uint32_t hash_key(const uint8_t *k, uint32_t n)
{
    uint32_t h = 2166136261u;                       /* FNV-1a: deterministic, no seed */
    for (uint32_t i = 0; i < n; i++)
        h = (h ^ k[i]) * 16777619u;
    return h;
}

void bn_htab_free(struct bn_htab *h)
{
    if (!h)
        return;
    free(h->bucket);
    free(h->chain);
    free(h->onext);
    free(h->oprev);
    free(h);
}

/* `keys` and `values` are the caller's (Python's buffers, zeroed, max_entries * key_size
 * and max_entries * ncpus * vstride bytes): a view of a value outlives the table. */
struct bn_htab *bn_htab_new(uint32_t key_size, uint32_t value_size, uint32_t max_entries,
                            uint32_t ncpus, uint32_t lru, uint8_t *keys, uint8_t *values)
{
    struct bn_htab *h = calloc(1, sizeof(*h));
    if (!h || !max_entries || !ncpus)
        return (bn_htab_free(h), NULL);
    uint32_t nb = 1;
    while (nb < max_entries && nb < 0x80000000u)
        nb <<= 1;
    h->key_size = key_size;
    h->value_size = value_size;
    h->vstride = (value_size + 7) & ~7u;
    h->ncpus = ncpus;
    h->max_entries = max_entries;
    h->nbuckets = nb;
    h->lru = lru;
    h->bucket = malloc(sizeof(uint32_t) * nb);
    h->chain = malloc(sizeof(uint32_t) * max_entries);
    h->onext = malloc(sizeof(uint32_t) * max_entries);
    h->oprev = malloc(sizeof(uint32_t) * max_entries);
    h->keys = keys;
    h->values = values;
    if (!h->bucket || !h->chain || !h->onext || !h->oprev || !keys || !values)
        return (bn_htab_free(h), NULL);
    memset(h->bucket, 0xff, sizeof(uint32_t) * nb);
    for (uint32_t s = 0; s < max_entries; s++)      /* free list: slot 0 first */
        h->chain[s] = s + 1 < max_entries ? s + 1 : NIL;
    h->free_head = 0;
    h->head = h->tail = NIL;
    return h;
}

static uint32_t find(const struct bn_htab *h, const uint8_t *key, uint32_t *bucket)
{
    uint32_t b = hash_key(key, h->key_size) & (h->nbuckets - 1);
    if (bucket)
        *bucket = b;
    for (uint32_t s = h->bucket[b]; s != NIL; s = h->chain[s])
        if (!memcmp(h->keys + (uint64_t)s * h->key_size, key, h->key_size))
            return s;
    return NIL;
}

static void order_unlink(struct bn_htab *h, uint32_t s)
{
    uint32_t p = h->oprev[s], n = h->onext[s];
    if (p != NIL) h->onext[p] = n; else h->head = n;
    if (n != NIL) h->oprev[n] = p; else h->tail = p;
}

static void order_append(struct bn_htab *h, uint32_t s)
{
    h->oprev[s] = h->tail;
    h->onext[s] = NIL;
    if (h->tail != NIL) h->onext[h->tail] = s; else h->head = s;
    h->tail = s;
}

static void remove_slot(struct bn_htab *h, uint32_t s)
{
    uint32_t b = hash_key(h->keys + (uint64_t)s * h->key_size, h->key_size) & (h->nbuckets - 1);
    uint32_t *link = &h->bucket[b];
    while (*link != s)
        link = &h->chain[*link];
    *link = h->chain[s];
    order_unlink(h, s);
    h->chain[s] = h->free_head;
    h->free_head = s;
    h->count--;
}

static uint8_t *value_at(const struct bn_htab *h, uint32_t s, uint32_t cpu)
{
    return h->values + ((uint64_t)s * h->ncpus + cpu) * h->vstride;
}

/* The slot of `key`, or -1; `touch`: an LRU map's use (the element moves to the end). */
int64_t bn_htab_find(struct bn_htab *h, const uint8_t *key, uint32_t touch)
{
    uint32_t s = find(h, key, NULL);
    if (s == NIL)
        return -1;
    if (touch && h->lru) {
        order_unlink(h, s);
        order_append(h, s);
    }
    return s;
}

/* htab_map_update_elem: 0 or -errno. cpu < 0: the value on every CPU, else on that one.
 * Flags past BPF_EXIST are refused, BPF_F_LOCK among them: no value here holds a
 * bpf_spin_lock (the LRU and per-CPU updates refuse anything past BPF_EXIST anyway). */
int64_t bn_htab_update(struct bn_htab *h, const uint8_t *key, const uint8_t *value,
                       uint64_t flags, int64_t cpu)
{
    if (flags > BPF_EXIST_)
        return -EINVAL_;
    /* An LRU update takes a free element before it looks the key up (prealloc_lru_pop;
     * the per-CPU form not for BPF_EXIST): on a full map that evicts the least recently
     * used one, even when the key is present or the flags then fail. */
    if ((h->lru == BN_LRU || (h->lru == BN_LRU_PERCPU && flags != BPF_EXIST_))
        && h->count >= h->max_entries)
        remove_slot(h, h->head);
    uint32_t b, s = find(h, key, &b);
    if (s != NIL && flags == BPF_NOEXIST_)
        return -EEXIST_;
    if (s == NIL && flags == BPF_EXIST_)
        return -ENOENT_;
    if (s == NIL) {
        if (h->count >= h->max_entries) {
            if (!h->lru)
                return -E2BIG_;
            remove_slot(h, h->head);            /* the least recently used goes */
            find(h, key, &b);
        }
        s = h->free_head;
        h->free_head = h->chain[s];
        memcpy(h->keys + (uint64_t)s * h->key_size, key, h->key_size);
        memset(value_at(h, s, 0), 0, (uint64_t)h->ncpus * h->vstride);
        h->chain[s] = h->bucket[b];
        h->bucket[b] = s;
        order_append(h, s);
        h->count++;
    } else if (h->lru) {
        order_unlink(h, s);
        order_append(h, s);
    }
    for (uint32_t c = 0; c < h->ncpus; c++)
        if (cpu < 0 || (uint64_t)cpu == c)
            memcpy(value_at(h, s, c), value, h->value_size);
    return 0;
}

int64_t bn_htab_delete(struct bn_htab *h, const uint8_t *key)
{
    uint32_t s = find(h, key, NULL);
    if (s == NIL)
        return -ENOENT_;
    remove_slot(h, s);
    return 0;
}

/* get_next_key: the slot of the key after `key` in insertion order (the first key when
 * `key` is NULL or absent, as the kernel restarts), or -ENOENT. */
int64_t bn_htab_next(struct bn_htab *h, const uint8_t *key)
{
    uint32_t s = key ? find(h, key, NULL) : NIL;
    uint32_t n = s == NIL ? h->head : h->onext[s];
    return n == NIL ? -ENOENT_ : (int64_t)n;
}

/* --- get_prandom_u32: the run environment's Mersenne Twister ------------------------------ */

/* MT19937 as CPython's random module runs it (getrandbits(32) is one output), so C and
 * Python draw from one state (probes/native/bpf_native.py NativeRandom). */
enum { MT_N = 624, MT_M = 397 };
struct bn_mt { uint32_t mt[MT_N]; uint32_t index; };

static uint32_t mt_twist(uint32_t a, uint32_t b, uint32_t m)
{
    uint32_t y = (a & 0x80000000u) | (b & 0x7fffffffu);
    return m ^ (y >> 1) ^ ((y & 1u) ? 0x9908b0dfu : 0u);
}

uint32_t bn_mt_next(struct bn_mt *r)
{
    uint32_t *mt = r->mt, y;
    if (r->index >= MT_N) {
        int k;
        for (k = 0; k < MT_N - MT_M; k++)
            mt[k] = mt_twist(mt[k], mt[k + 1], mt[k + MT_M]);
        for (; k < MT_N - 1; k++)
            mt[k] = mt_twist(mt[k], mt[k + 1], mt[k + MT_M - MT_N]);
        mt[MT_N - 1] = mt_twist(mt[MT_N - 1], mt[0], mt[MT_M - 1]);
        r->index = 0;
    }
    y = mt[r->index++];
    y ^= y >> 11;
    y ^= (y << 7) & 0x9d2c5680u;
    y ^= (y << 15) & 0xefc60000u;
    return y ^ (y >> 18);
}

/* --- the helper trampoline's host entry ------------------------------------------------- */

typedef int (*reg_fn)(void *uc, int regid, void *value);
typedef int (*mem_fn)(void *uc, uint64_t addr, void *bytes, uint64_t size);
typedef void (*code_cb)(void *uc, uint64_t addr, uint32_t size, void *user_data);

enum { BPF_FUNC_map_lookup_elem = 1, BPF_FUNC_map_update_elem = 2, BPF_FUNC_map_delete_elem = 3,
       BPF_FUNC_get_prandom_u32 = 7, BPF_FUNC_get_smp_processor_id = 8,
       BPF_FUNC_get_current_pid_tgid = 14, BPF_FUNC_get_current_uid_gid = 15,
       BPF_FUNC_get_current_comm = 16, BPF_FUNC_get_current_task = 35 };
#define TASK_COMM_LEN 16

/* A map C serves, by its handle in the calling image's run: a hash map, or an array map
 * whose values live in its guest window (jit_guest's MapBacking: the window holds them
 * while images run, and Python reads them back from there). */
struct bn_map {
    uint64_t handle;
    struct bn_htab *htab;                           /* NULL: an array map */
    uint64_t window;                                /* guest address of element 0's
                                                     * value (a hash map: 0, unmapped) */
    uint32_t max_entries, elem_size, value_size;
    int32_t cpu;                                    /* BN_THIS_CPU (per-CPU maps), or -1 */
};
#define BN_THIS_CPU (-2)                            /* the running CPU's value (bn_jit.cpu) */
struct bn_image {
    uint64_t start, end;
    struct bn_map *maps;
    uint64_t nmaps;
    struct bn_mt *rng;                              /* its run's generator, or NULL */
};

struct bn_jit {                                     /* one ScratchJit in a traced guest */
    reg_fn reg_read, reg_write;
    mem_fn mem_read, mem_write;
    uint64_t **fp;                                  /* where the clock's counter is */
    const uint64_t *handler_fp;                     /* one host-handler charge, 1/256 cycles */
    uint64_t helper_cycles;                         /* charged since Python folded them */
    int32_t args[5], ret_reg;                       /* Unicorn ids of r1-r5, r0 */
    int32_t link_reg, sp_reg;                       /* link_reg < 0: return address at [sp] */
    uint32_t call_size, executing;                  /* executing: a nested run (Python's) */
    uint32_t cpu, pad;                              /* the running CPU: a cpu_listener's */
    uint64_t stack_lo, stack_hi;                    /* the native stack window */
    struct bn_image *images;
    uint64_t nimages;
    uint64_t served, deferred;
    /* current as BpfTrace.current_task computes it for the task on the running CPU:
     * Python writes it and sets task_valid; a task switch clears it (the next call goes
     * to Python, which writes it again), a CPU switch writes it at once. */
    uint32_t task_valid, pad2;
    uint64_t pid_tgid, uid_gid, task;
    uint8_t comm[TASK_COMM_LEN];                    /* NUL-padded, at most 15 bytes */
};

struct bn_stub {                                    /* one trampoline's hook data */
    struct bn_jit *j;
    code_cb orig;                                   /* the Python host entry */
    void *orig_data;
    uint64_t fid;
};

static const struct bn_map *map_of(const struct bn_image *img, uint64_t handle)
{
    for (uint64_t i = 0; i < img->nmaps; i++)
        if (img->maps[i].handle == handle)
            return &img->maps[i];
    return NULL;
}

/* arraymap.c array_map_update_elem on the guest window: 0, -errno, or 1 (not served).
 * Its order: unknown flags, the index, NOEXIST, then BPF_F_LOCK (no bpf_spin_lock). */
static int64_t array_update(struct bn_jit *j, void *uc, const struct bn_map *m,
                            const uint8_t *key, const uint8_t *value, uint64_t flags)
{
    uint32_t idx;
    if ((flags & ~(uint64_t)BPF_F_LOCK_) > BPF_EXIST_)
        return -EINVAL_;
    memcpy(&idx, key, 4);
    if (idx >= m->max_entries)
        return -E2BIG_;
    if (flags & BPF_NOEXIST_)
        return -EEXIST_;                            /* every element of an array exists */
    if (flags & BPF_F_LOCK_)
        return -EINVAL_;
    return j->mem_write(uc, m->window + (uint64_t)idx * m->elem_size, (void *)value,
                        m->value_size) ? 1 : 0;
}

static const struct bn_image *image_at(const struct bn_jit *j, uint64_t ret)
{
    uint64_t call = ret - j->call_size;
    for (uint64_t i = 0; i < j->nimages; i++)
        if (j->images[i].start <= call && call < j->images[i].end)
            return &j->images[i];
    return NULL;
}

/* One read of the live native stack from `lo` (each uc_mem_read is a trip through
 * Unicorn's memory lookup): the key and the value, and on x86 the return address at sp. */
#define BN_SPAN 1024

static uint64_t min64(uint64_t a, uint64_t b) { return a < b ? a : b; }

static void finish(struct bn_jit *j, void *uc, uint64_t r0)
{
    uint64_t fp = **j->fp + *j->handler_fp;         /* the host handler's charge, as Python's */
    **j->fp = fp < **j->fp ? UINT64_MAX : fp;
    j->helper_cycles += *j->handler_fp >> 8;
    j->reg_write(uc, j->ret_reg, &r0);
    j->served++;
}

/* The image whose call reached the trampoline (its return address: the link register,
 * or on x86 the word at sp inside the native stack), or NULL. */
static const struct bn_image *caller(struct bn_jit *j, void *uc)
{
    uint64_t ret = 0, sp = 0;
    if (j->link_reg >= 0) {
        j->reg_read(uc, j->link_reg, &ret);
    } else {                                        /* [sp] only inside the native stack */
        j->reg_read(uc, j->sp_reg, &sp);
        if (sp < j->stack_lo || sp >= j->stack_hi || j->stack_hi - sp < 8)
            return NULL;
        if (j->mem_read(uc, sp, &ret, 8))
            return NULL;
    }
    return image_at(j, ret);
}

/* Helpers with no arguments, from a registered image: get_smp_processor_id (the running
 * CPU, which Python's entry names too: it sets the run's CPU to the machine's),
 * get_prandom_u32 (the run's generator) and current's pid/tgid, uid/gid and task. */
static int serve_noargs(struct bn_jit *j, void *uc, uint64_t fid)
{
    int task = fid == BPF_FUNC_get_current_pid_tgid || fid == BPF_FUNC_get_current_uid_gid
               || fid == BPF_FUNC_get_current_task;
    if (task && !j->task_valid)
        return 0;
    const struct bn_image *img = caller(j, uc);
    if (!img)
        return 0;
    if (fid == BPF_FUNC_get_smp_processor_id)
        finish(j, uc, j->cpu);
    else if (fid == BPF_FUNC_get_prandom_u32 && img->rng)
        finish(j, uc, bn_mt_next(img->rng));
    else if (fid == BPF_FUNC_get_current_pid_tgid)
        finish(j, uc, j->pid_tgid);
    else if (fid == BPF_FUNC_get_current_uid_gid)
        finish(j, uc, j->uid_gid);
    else if (fid == BPF_FUNC_get_current_task)
        finish(j, uc, j->task);
    else
        return 0;
    return 1;
}

/* bpf_get_current_comm(buf, size) with buf on the live native stack: strscpy_pad of
 * current->comm, i.e. at most size - 1 bytes of it and NULs to size, and r0 = 0 (the
 * kernel's -EINVAL is for no task, which never happens here). A buffer elsewhere (a map
 * value) or a zero size goes to Python. */
static int serve_comm(struct bn_jit *j, void *uc)
{
    uint64_t buf = 0, size = 0, sp = 0;
    uint8_t out[BN_SPAN];
    if (!j->task_valid)
        return 0;
    j->reg_read(uc, j->args[0], &buf);
    j->reg_read(uc, j->args[1], &size);
    j->reg_read(uc, j->sp_reg, &sp);
    if (!size || size > BN_SPAN || buf < sp || buf < j->stack_lo || buf >= j->stack_hi
        || j->stack_hi - buf < size)
        return 0;
    if (!caller(j, uc))
        return 0;
    uint64_t n = min64(size - 1, TASK_COMM_LEN - 1);
    memset(out, 0, size);
    memcpy(out, j->comm, n);
    if (j->mem_write(uc, buf, out, size))
        return 0;
    finish(j, uc, 0);
    return 1;
}

/* htab_map_lookup_elem from a program (an LRU element is marked used): r0 = the guest
 * address of the value the guest maps at m->window, or 0. */
static int serve_lookup(struct bn_jit *j, void *uc, const struct bn_map *m, const uint8_t *key)
{
    const struct bn_htab *h = m->htab;
    int64_t s = bn_htab_find(m->htab, key, 1);
    uint64_t cpu = m->cpu == BN_THIS_CPU ? j->cpu : m->cpu < 0 ? 0 : (uint64_t)m->cpu;
    finish(j, uc, s < 0 ? 0 : m->window + ((uint64_t)s * h->ncpus + cpu) * h->vstride);
    return 1;
}

/* The helper in C: 1 if served (r0 written), 0 to hand it to Python untouched. Its
 * arguments must be where Python's helper finds them: the map one of the calling image's
 * run, the key and value on the live native stack (the window Python copies in). */
static int serve(struct bn_jit *j, void *uc, uint64_t fid)
{
    uint64_t r[5] = {0}, r0, sp = 0, ret = 0, lo, n;
    uint8_t buf[BN_SPAN];
    int update = fid == BPF_FUNC_map_update_elem, lookup = fid == BPF_FUNC_map_lookup_elem;
    if (fid == BPF_FUNC_get_current_comm)
        return serve_comm(j, uc);
    if (fid != BPF_FUNC_map_lookup_elem && fid != BPF_FUNC_map_update_elem
        && fid != BPF_FUNC_map_delete_elem)
        return serve_noargs(j, uc, fid);
    for (int i = 0; i < (update ? 4 : 2); i++)
        j->reg_read(uc, j->args[i], &r[i]);
    j->reg_read(uc, j->sp_reg, &sp);
    if (j->link_reg >= 0) {
        j->reg_read(uc, j->link_reg, &ret);
        lo = update ? min64(r[1], r[2]) : r[1];
    } else {
        lo = sp;
    }
    if (lo < sp || lo < j->stack_lo || lo >= j->stack_hi)
        return 0;
    n = min64(BN_SPAN, j->stack_hi - lo);
    if (j->mem_read(uc, lo, buf, n))
        return 0;
    if (j->link_reg < 0) {
        if (n < 8)
            return 0;
        memcpy(&ret, buf, 8);
    }
    const struct bn_image *img = image_at(j, ret);
    const struct bn_map *m = img ? map_of(img, r[0]) : NULL;
    if (!m)
        return 0;
    struct bn_htab *h = m->htab;
    uint32_t ks = h ? h->key_size : 4, vs = h ? h->value_size : m->value_size;
    if (r[1] < lo || r[1] - lo > n || n - (r[1] - lo) < ks)
        return 0;
    if (update && (r[2] < lo || r[2] - lo > n || n - (r[2] - lo) < vs))
        return 0;
    const uint8_t *key = buf + (r[1] - lo), *value = buf + (r[2] - lo);
    int64_t rc;
    if (lookup)
        return h && m->window ? serve_lookup(j, uc, m, key) : 0;
    if (h)
        rc = update ? bn_htab_update(h, key, value, r[3],
                                     m->cpu == BN_THIS_CPU ? (int64_t)j->cpu : m->cpu)
                    : bn_htab_delete(h, key);
    else
        rc = update ? array_update(j, uc, m, key, value, r[3]) : -EINVAL_;
    if (rc == 1)
        return 0;
    r0 = (uint64_t)rc;
    finish(j, uc, r0);
    return 1;
}

void bn_helper_hook(void *uc, uint64_t addr, uint32_t size, void *user_data)
{
    struct bn_stub *st = user_data;
    struct bn_jit *j = st->j;
    if (j->executing || !serve(j, uc, st->fid)) {
        j->deferred++;
        st->orig(uc, addr, size, st->orig_data);
    }
}
