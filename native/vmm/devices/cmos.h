/*
 * The PC's CMOS real-time clock at ports 0x70 (index) and 0x71 (data), read
 * only: every read of a time register answers the host's current UTC time
 * (BCD, 24-hour), so the guest's RTC reads are sane and no clock has to be
 * kept or moved on after a fork or a restore. Writes to the data port are
 * ignored; the index register is the only state.
 */
#ifndef CLADE_CMOS_H
#define CLADE_CMOS_H

#include <stdbool.h>
#include <stdint.h>

#define CMOS_INDEX_PORT 0x70
#define CMOS_DATA_PORT 0x71

struct cmos {
    uint8_t index;
};

void cmos_init(struct cmos *c);

/* KVM_EXIT_IO: false if the access is not a one-byte access to 0x70 or 0x71. */
bool cmos_io(struct cmos *c, uint16_t port, bool is_write, uint8_t *data, unsigned size);

/* Saved state: the index register, plain data. Restore refuses (c unchanged) an index above 0x7f. */
struct cmos_state {
    uint8_t index;
    uint8_t reserved[7]; /* 0 */
};

void cmos_save(const struct cmos *c, struct cmos_state *s);
bool cmos_restore(struct cmos *c, const struct cmos_state *s);

#endif
