/*
 * Split virtqueues (virtio 1.x, section 2.7) read and written in guest RAM.
 * The ring memory belongs to the guest, which may change it at any moment,
 * so every descriptor is copied out once and checked before use: indices
 * against the queue size, chain length against the queue size (no cycles),
 * buffers against guest RAM, and device-readable buffers before
 * device-writable ones. Indirect descriptors and EVENT_IDX are not offered;
 * a descriptor carrying the INDIRECT flag is an error.
 *
 * An error makes the queue "broken": it stops doing anything until it is
 * set up again, and the transport reports DEVICE_NEEDS_RESET.
 */
#ifndef CLADE_VIRTQ_H
#define CLADE_VIRTQ_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/uio.h>

#include "guest_mem.h"

#define VIRTQ_MAX_SIZE 256 /* largest queue any device here offers */

#define VIRTQ_DESC_F_NEXT 1
#define VIRTQ_DESC_F_WRITE 2
#define VIRTQ_DESC_F_INDIRECT 4
#define VIRTQ_AVAIL_F_NO_INTERRUPT 1

struct virtq {
    const struct guest_mem *mem;
    uint64_t desc_gpa, avail_gpa, used_gpa;
    uint16_t size;           /* power of two, <= VIRTQ_MAX_SIZE */
    uint16_t last_avail_idx; /* next avail entry the device will take */
    uint16_t used_idx;       /* device's copy of used->idx */
    bool ready;
    bool broken;
};

/* One buffer of a chain, already translated to host memory. */
struct virtq_chain {
    uint16_t head;
    unsigned n_out, n_in; /* device-readable segments come first, then writable */
    uint64_t out_bytes, in_bytes;
    struct iovec seg[VIRTQ_MAX_SIZE]; /* last: virtq_pop clears only what precedes it */
};

/* Saved state: the device's ring positions. The ring addresses and size
 * are the transport's (struct virtio_pci_queue_state), set up again first. */
struct virtq_state {
    uint16_t last_avail_idx, used_idx;
    uint8_t broken;
    uint8_t reserved[3]; /* 0 */
};

void virtq_save(const struct virtq *q, struct virtq_state *s);
/* Onto a queue just set up with virtq_setup (or reset): false if s is malformed. */
bool virtq_restore(struct virtq *q, const struct virtq_state *s);

/* Checks the layout (size a power of two within max, rings aligned and inside
 * guest RAM) and makes the queue ready. False leaves it not ready. */
bool virtq_setup(struct virtq *q, const struct guest_mem *mem, uint16_t size, uint16_t max_size,
                 uint64_t desc, uint64_t avail, uint64_t used);
void virtq_reset(struct virtq *q);

/* Takes the next available chain: 1 on success, 0 when none is available,
 * -1 when the guest's ring is invalid (the queue is then broken). */
int virtq_pop(struct virtq *q, struct virtq_chain *chain);

/* Gives back the chain just popped, untouched, to be taken again later. */
void virtq_unpop(struct virtq *q);

/* Returns a chain to the guest with the number of bytes written into it. */
void virtq_push(struct virtq *q, uint16_t head, uint32_t written);

/* Whether the guest wants an interrupt for used buffers now. */
bool virtq_wants_interrupt(const struct virtq *q);

/* True if the guest has made chains available that the device has not taken. */
bool virtq_has_avail(const struct virtq *q);

#endif
