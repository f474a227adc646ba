#include "virtq.h"

#include <string.h>

#define DESC_SIZE 16
#define USED_ELEM_SIZE 8

struct desc {
    uint64_t addr;
    uint32_t len;
    uint16_t flags;
    uint16_t next;
};

static uint64_t avail_bytes(uint16_t size) { return 4 + 2ull * size + 2; }
static uint64_t used_bytes(uint16_t size) { return 4 + (uint64_t)USED_ELEM_SIZE * size + 2; }

bool virtq_setup(struct virtq *q, const struct guest_mem *mem, uint16_t size, uint16_t max_size,
                 uint64_t desc, uint64_t avail, uint64_t used)
{
    virtq_reset(q);
    if (size == 0 || (size & (size - 1)) || size > max_size || size > VIRTQ_MAX_SIZE)
        return false;
    /* Alignment from the spec's table (16, 2, 4) also keeps the index
     * fields naturally aligned for the atomic accesses below. */
    if ((desc & 15) || (avail & 1) || (used & 3))
        return false;
    if (!guest_mem_ptr(mem, desc, (uint64_t)DESC_SIZE * size) || !guest_mem_ptr(mem, avail, avail_bytes(size)) ||
        !guest_mem_ptr(mem, used, used_bytes(size)))
        return false;
    q->mem = mem;
    q->size = size;
    q->desc_gpa = desc;
    q->avail_gpa = avail;
    q->used_gpa = used;
    q->ready = true;
    return true;
}

void virtq_reset(struct virtq *q) { memset(q, 0, sizeof *q); }

/* Ring fields are re-translated on each use: cheap, and a pointer kept
 * across calls would be one more thing to get wrong after a reset. */
static uint16_t *avail_field(const struct virtq *q, uint64_t off)
{
    return guest_mem_ptr(q->mem, q->avail_gpa + off, 2);
}

static uint16_t load16(const uint16_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }

static int fail(struct virtq *q)
{
    q->broken = true;
    return -1;
}

bool virtq_has_avail(const struct virtq *q)
{
    if (!q->ready || q->broken)
        return false;
    return load16(avail_field(q, 2)) != q->last_avail_idx;
}

static bool read_desc(const struct virtq *q, uint16_t i, struct desc *d)
{
    const uint8_t *p = guest_mem_ptr(q->mem, q->desc_gpa + (uint64_t)DESC_SIZE * i, DESC_SIZE);
    if (!p)
        return false;
    uint8_t raw[DESC_SIZE];
    memcpy(raw, p, DESC_SIZE); /* one fetch: the guest cannot change it under us */
    memcpy(&d->addr, raw, 8);
    memcpy(&d->len, raw + 8, 4);
    memcpy(&d->flags, raw + 12, 2);
    memcpy(&d->next, raw + 14, 2);
    return true;
}

static bool add_segment(const struct virtq *q, struct virtq_chain *c, const struct desc *d)
{
    bool writable = d->flags & VIRTQ_DESC_F_WRITE;
    if (!writable && c->n_in > 0)
        return false; /* readable after writable: forbidden by the spec */
    if (d->len == 0)
        return true;
    void *host = guest_mem_ptr(q->mem, d->addr, d->len);
    if (!host)
        return false;
    c->seg[c->n_out + c->n_in] = (struct iovec){.iov_base = host, .iov_len = d->len};
    if (writable) {
        c->n_in++;
        c->in_bytes += d->len;
    } else {
        c->n_out++;
        c->out_bytes += d->len;
    }
    return true;
}

int virtq_pop(struct virtq *q, struct virtq_chain *c)
{
    if (!q->ready || q->broken)
        return q->broken ? -1 : 0;
    uint16_t avail_idx = load16(avail_field(q, 2));
    uint16_t pending = (uint16_t)(avail_idx - q->last_avail_idx);
    if (pending == 0)
        return 0;
    if (pending > q->size)
        return fail(q); /* the guest claims more buffers than the ring holds */
    uint16_t head = load16(avail_field(q, 4 + 2ull * (q->last_avail_idx & (q->size - 1))));
    if (head >= q->size)
        return fail(q);
    memset(c, 0, offsetof(struct virtq_chain, seg));
    c->head = head;
    uint16_t i = head;
    /* A chain can visit each descriptor at most once, so more than size
     * steps means a loop. */
    for (unsigned steps = 0;; steps++) {
        struct desc d;
        if (steps >= q->size || !read_desc(q, i, &d))
            return fail(q);
        if ((d.flags & VIRTQ_DESC_F_INDIRECT) || !add_segment(q, c, &d))
            return fail(q);
        if (!(d.flags & VIRTQ_DESC_F_NEXT))
            break;
        if (d.next >= q->size)
            return fail(q);
        i = d.next;
    }
    if (c->out_bytes > UINT32_MAX || c->in_bytes > UINT32_MAX)
        return fail(q); /* used.len is 32 bits; the spec bounds chains likewise */
    q->last_avail_idx++;
    return 1;
}

void virtq_unpop(struct virtq *q) { q->last_avail_idx--; }

void virtq_push(struct virtq *q, uint16_t head, uint32_t written)
{
    if (!q->ready || q->broken)
        return;
    uint8_t *elem = guest_mem_ptr(q->mem, q->used_gpa + 4 + (uint64_t)USED_ELEM_SIZE * (q->used_idx & (q->size - 1)),
                                  USED_ELEM_SIZE);
    uint32_t id = head;
    memcpy(elem, &id, 4);
    memcpy(elem + 4, &written, 4);
    q->used_idx++;
    /* The element must be visible before the index that publishes it. */
    uint16_t *idx = guest_mem_ptr(q->mem, q->used_gpa + 2, 2);
    __atomic_store_n(idx, q->used_idx, __ATOMIC_RELEASE);
}

bool virtq_wants_interrupt(const struct virtq *q)
{
    if (!q->ready || q->broken)
        return false;
    /* Order our used->idx store before reading the guest's flags, so an
     * interrupt is never lost to a driver that just re-enabled them. */
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    return !(load16(avail_field(q, 0)) & VIRTQ_AVAIL_F_NO_INTERRUPT);
}

void virtq_save(const struct virtq *q, struct virtq_state *s)
{
    memset(s, 0, sizeof *s);
    s->last_avail_idx = q->last_avail_idx;
    s->used_idx = q->used_idx;
    s->broken = q->broken;
}

bool virtq_restore(struct virtq *q, const struct virtq_state *s)
{
    if (s->broken > 1 || s->reserved[0] || s->reserved[1] || s->reserved[2])
        return false;
    /* Any index is one the guest could have produced: the 16-bit counters
     * wrap, and virtq_pop checks the distance to the guest's own index. */
    q->last_avail_idx = s->last_avail_idx;
    q->used_idx = s->used_idx;
    q->broken = s->broken;
    return true;
}
