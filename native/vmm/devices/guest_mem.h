/*
 * Guest-physical memory as the devices see it: a short list of RAM regions
 * mapped in this process. Every address a device reads from guest memory or
 * from a guest-written register goes through guest_mem_ptr(), which refuses
 * anything that is not entirely inside one region: the guest is untrusted.
 */
#ifndef CLADE_GUEST_MEM_H
#define CLADE_GUEST_MEM_H

#include <stdbool.h>
#include <stdint.h>

#define GUEST_MEM_MAX_REGIONS 4

struct guest_region {
    uint64_t gpa;  /* guest-physical start */
    uint64_t size; /* bytes */
    uint8_t *host; /* where those bytes are mapped in this process */
};

struct guest_mem {
    struct guest_region region[GUEST_MEM_MAX_REGIONS];
    unsigned count;
};

/* Adds a region; false if the table is full, the region is empty, wraps
 * around the address space or overlaps a region already added. */
bool guest_mem_add(struct guest_mem *mem, uint64_t gpa, uint64_t size, void *host);

/* Host pointer for guest bytes [gpa, gpa+len), or NULL when any byte of the
 * range is outside guest RAM or the range wraps. len 0 is treated as 1 byte so
 * that a returned pointer is always dereferenceable. */
void *guest_mem_ptr(const struct guest_mem *mem, uint64_t gpa, uint64_t len);

#endif
