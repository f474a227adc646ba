/* The read-only CMOS clock (cmos.h). */
#include "cmos.h"

#include <string.h>
#include <time.h>

#define CMOS_INDEX_MASK 0x7f /* bit 7 of an index write is the NMI mask, not part of the index */

void cmos_init(struct cmos *c) {
    memset(c, 0, sizeof *c);
}

static uint8_t bcd(int v) { return (uint8_t)((v / 10) << 4 | (v % 10)); }

/* The host's UTC time in BCD, 24-hour mode, "update in progress" never set. */
static uint8_t cmos_read(uint8_t index) {
    time_t now = time(NULL);
    struct tm tm;
    gmtime_r(&now, &tm);
    switch (index) {
    case 0x00: return bcd(tm.tm_sec);
    case 0x02: return bcd(tm.tm_min);
    case 0x04: return bcd(tm.tm_hour);
    case 0x06: return bcd(tm.tm_wday + 1);
    case 0x07: return bcd(tm.tm_mday);
    case 0x08: return bcd(tm.tm_mon + 1);
    case 0x09: return bcd(tm.tm_year % 100);
    case 0x32: return bcd(19 + tm.tm_year / 100);
    case 0x0a: return 0x26; /* 32.768 kHz base, 1024 Hz rate, UIP clear */
    case 0x0b: return 0x02; /* 24-hour, BCD, no interrupts */
    case 0x0d: return 0x80; /* battery good */
    default: return 0;
    }
}

bool cmos_io(struct cmos *c, uint16_t port, bool is_write, uint8_t *data, unsigned size) {
    if (size != 1 || (port != CMOS_INDEX_PORT && port != CMOS_DATA_PORT)) return false;
    if (port == CMOS_INDEX_PORT) {
        if (is_write) c->index = data[0] & CMOS_INDEX_MASK;
        else data[0] = 0xff;
    } else if (!is_write) {
        data[0] = cmos_read(c->index);
    }
    return true;
}

void cmos_save(const struct cmos *c, struct cmos_state *s) {
    memset(s, 0, sizeof *s);
    s->index = c->index;
}

bool cmos_restore(struct cmos *c, const struct cmos_state *s) {
    static const uint8_t zero[sizeof s->reserved];
    if (s->index > CMOS_INDEX_MASK || memcmp(s->reserved, zero, sizeof zero)) return false;
    c->index = s->index;
    return true;
}
