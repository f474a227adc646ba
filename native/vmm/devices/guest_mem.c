#include "guest_mem.h"

#include <stddef.h>

static bool ranges_overlap(uint64_t a, uint64_t alen, uint64_t b, uint64_t blen)
{
    return a < b + blen && b < a + alen;
}

bool guest_mem_add(struct guest_mem *mem, uint64_t gpa, uint64_t size, void *host)
{
    if (mem->count >= GUEST_MEM_MAX_REGIONS || size == 0 || host == NULL)
        return false;
    if (gpa + size < gpa)
        return false; /* wraps */
    for (unsigned i = 0; i < mem->count; i++)
        if (ranges_overlap(gpa, size, mem->region[i].gpa, mem->region[i].size))
            return false;
    mem->region[mem->count++] = (struct guest_region){.gpa = gpa, .size = size, .host = host};
    return true;
}

void *guest_mem_ptr(const struct guest_mem *mem, uint64_t gpa, uint64_t len)
{
    if (len == 0)
        len = 1;
    for (unsigned i = 0; i < mem->count; i++) {
        const struct guest_region *r = &mem->region[i];
        /* Written as subtractions so that no sum can overflow. */
        if (gpa < r->gpa || gpa - r->gpa >= r->size)
            continue;
        uint64_t offset = gpa - r->gpa;
        if (len > r->size - offset)
            return NULL; /* runs off the end of this region */
        return r->host + offset;
    }
    return NULL;
}
