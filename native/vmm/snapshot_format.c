/*
 * state.bin as bytes, both ways (docs/snapshots.md, "vmm engine"): no KVM,
 * no files, so the decoder can be fuzzed on its own (devices/fuzz/fuzz_state.c).
 *
 * The decoder trusts nothing in the file. It checks the checksum first (a
 * damaged file is refused with a message that says so), then every size,
 * count, index and flag, and copies values out into a struct snapshot_image
 * that holds no pointer taken from the file. The checksum is not a defence
 * against someone who can rewrite the file (they can recompute it); the
 * checks are, and the device state is checked once more by each device
 * (board_restore) against the devices this process built.
 */
#include "vmm.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define RAM_ALIGN (2u << 20)
#define CHECKSUM_OFFSET offsetof(struct snapshot_header, checksum)

_Static_assert(sizeof(struct snapshot_header) == 112, "state.bin header layout");
_Static_assert(sizeof(struct snapshot_section) == 16, "state.bin section header layout");

/*
 * FNV-1a, 64 bits. Each step (xor a byte, multiply by an odd constant) is a
 * bijection of the running value, so changing any single byte always changes
 * the result: every one-byte corruption is caught, not just most.
 */
uint64_t snapshot_checksum(const uint8_t *buf, size_t len) {
    uint64_t h = 0xcbf29ce484222325ull;
    for (size_t i = 0; i < len; i++) {
        uint8_t byte = i >= CHECKSUM_OFFSET && i < CHECKSUM_OFFSET + 8 ? 0 : buf[i];
        h = (h ^ byte) * 0x100000001b3ull;
    }
    return h;
}

/* ---- encoding ------------------------------------------------------------- */

struct buffer {
    uint8_t *data;
    size_t used, cap;
};

static int put(struct buffer *b, const void *p, size_t n) {
    size_t padded = (n + 7) & ~(size_t)7;
    if (b->used + padded > b->cap) {
        size_t cap = (b->cap ? b->cap * 2 : 65536) + padded;
        uint8_t *d = realloc(b->data, cap);
        if (!d) return -1;
        b->data = d, b->cap = cap;
    }
    if (n) memcpy(b->data + b->used, p, n);
    memset(b->data + b->used + n, 0, padded - n);
    b->used += padded;
    return 0;
}

static int put_section(struct buffer *b, struct snapshot_header *h, uint32_t id, const void *p, size_t n) {
    struct snapshot_section s = {.id = id, .bytes = n};
    h->section_count++;
    return put(b, &s, sizeof s) < 0 ? -1 : put(b, p, n);
}

int snapshot_encode(const struct snapshot_image *img, uint8_t **out, size_t *len) {
    struct buffer b = {0};
    struct snapshot_header h = {.format = SNAPSHOT_FORMAT, .header_bytes = sizeof h, .build_id_len = img->build_id_len,
                                .ram_size = img->ram_size};
    memcpy(h.magic, SNAPSHOT_MAGIC, 8);
    memcpy(h.build_id, img->build_id, sizeof h.build_id);
    int r = put(&b, &h, sizeof h);
    r = r < 0 ? r : put_section(&b, &h, SNAP_VM_FACTS, &img->facts, sizeof img->facts);
    r = r < 0 ? r : put_section(&b, &h, SNAP_CPUID, img->cpuid, img->cpuid_count * sizeof img->cpuid[0]);
    r = r < 0 ? r : put_section(&b, &h, SNAP_VCPU, &img->vcpu, sizeof img->vcpu);
    r = r < 0 ? r : put_section(&b, &h, SNAP_XSAVE, img->xsave, img->facts.xsave_size);
    r = r < 0 ? r : put_section(&b, &h, SNAP_MSRS, img->msrs, img->facts.msr_count * sizeof img->msrs[0]);
    r = r < 0 ? r : put_section(&b, &h, SNAP_VM_STATE, &img->vm, sizeof img->vm);
    if (r == 0 && img->has_board) r = put_section(&b, &h, SNAP_BOARD, &img->board, sizeof img->board);
    if (r < 0) return free(b.data), -1;
    h.total_bytes = b.used;
    memcpy(b.data, &h, sizeof h); /* now with the section count and total */
    h.checksum = snapshot_checksum(b.data, b.used);
    memcpy(b.data, &h, sizeof h);
    *out = b.data;
    *len = b.used;
    return 0;
}

/* ---- decoding ------------------------------------------------------------- */

struct sections {
    const uint8_t *at[SNAP_BOARD + 1];
    uint64_t bytes[SNAP_BOARD + 1];
};

static int failf(char *err, size_t errlen, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static int failf(char *err, size_t errlen, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
    errno = EINVAL;
    return -1;
}

static int check_header(const uint8_t *buf, size_t len, struct snapshot_header *h, char *err, size_t errlen) {
    if (len < sizeof *h) return failf(err, errlen, "state.bin is truncated (%zu bytes, less than its header)", len);
    memcpy(h, buf, sizeof *h);
    if (memcmp(h->magic, SNAPSHOT_MAGIC, 8)) return failf(err, errlen, "state.bin is not a clade-vmm snapshot (bad magic)");
    if (h->format != SNAPSHOT_FORMAT || h->header_bytes != sizeof *h)
        return failf(err, errlen, "state.bin has format %u; this clade-vmm reads format %u: take the snapshot again", h->format,
                     SNAPSHOT_FORMAT);
    if (h->total_bytes != len) return failf(err, errlen, "state.bin is truncated or has trailing bytes (%zu of %llu bytes)", len,
                                            (unsigned long long)h->total_bytes);
    if (snapshot_checksum(buf, len) != h->checksum) return failf(err, errlen, "state.bin is damaged (checksum mismatch)");
    if (h->build_id_len > SNAPSHOT_BUILD_ID_MAX) return failf(err, errlen, "state.bin: build id length out of range");
    if (!h->ram_size || h->ram_size % RAM_ALIGN || h->ram_size > BOARD_MAX_RAM)
        return failf(err, errlen, "state.bin records an impossible guest RAM size");
    return 0;
}

/* Walks the section table; every section must lie inside the file, known ids at most once, padding zero. */
static int index_sections(const uint8_t *buf, size_t len, uint32_t count, struct sections *sec, char *err, size_t errlen) {
    size_t off = sizeof(struct snapshot_header);
    memset(sec, 0, sizeof *sec);
    for (uint32_t i = 0; i < count; i++) {
        struct snapshot_section s;
        if (len - off < sizeof s) return failf(err, errlen, "state.bin: section table runs past the end");
        memcpy(&s, buf + off, sizeof s);
        off += sizeof s;
        if (s.bytes > len - off) return failf(err, errlen, "state.bin: a section runs past the end");
        if (s.id < SNAP_VM_FACTS || s.id > SNAP_BOARD || sec->at[s.id] || s.reserved)
            return failf(err, errlen, "state.bin: unexpected or repeated section %u", s.id);
        sec->at[s.id] = buf + off;
        sec->bytes[s.id] = s.bytes;
        off += s.bytes;
        uint64_t pad = (8 - s.bytes % 8) % 8;
        if (pad > len - off) return failf(err, errlen, "state.bin: a section runs past the end");
        for (uint64_t k = 0; k < pad; k++)
            if (buf[off + k]) return failf(err, errlen, "state.bin: padding after section %u is not zero", s.id);
        off += pad;
    }
    return off == len ? 0 : failf(err, errlen, "state.bin: bytes after the last section");
}

/* Copies section id, which must be exactly `bytes` long. */
static int take(const struct sections *sec, int id, void *dst, uint64_t bytes, const char *what, char *err, size_t errlen) {
    if (!sec->at[id]) return failf(err, errlen, "state.bin: the %s section is missing", what);
    if (sec->bytes[id] != bytes)
        return failf(err, errlen, "state.bin: the %s section has %llu bytes, expected %llu", what, (unsigned long long)sec->bytes[id],
                     (unsigned long long)bytes);
    if (bytes) memcpy(dst, sec->at[id], bytes);
    return 0;
}

static int flag_ok(uint32_t v) { return v <= 1; }

static int check_facts(const struct snapshot_vm_facts *f, char *err, size_t errlen) {
    if (!flag_ok(f->has_xsave2) || !flag_ok(f->has_xcrs) || !flag_ok(f->has_sregs2) || !flag_ok(f->has_tsc_offset_attr) ||
        !flag_ok(f->has_debugregs) || !flag_ok(f->guest_linux))
        return failf(err, errlen, "state.bin: a VM fact flag is neither 0 nor 1");
    if (f->msr_count > VMM_MAX_MSRS) return failf(err, errlen, "state.bin: %u MSRs, at most %u", f->msr_count, VMM_MAX_MSRS);
    for (uint32_t i = f->msr_count; i < VMM_MAX_MSRS; i++)
        if (f->msr_index[i]) return failf(err, errlen, "state.bin: MSR list has entries past its count");
    if (f->xsave_size && (f->xsave_size < sizeof(struct kvm_xsave) || f->xsave_size > SNAPSHOT_MAX_XSAVE || f->xsave_size % 4))
        return failf(err, errlen, "state.bin: XSAVE size %u out of range", f->xsave_size);
    if (f->has_xsave2 && !f->xsave_size) return failf(err, errlen, "state.bin: XSAVE2 without an XSAVE size");
    return 0;
}

static int check_vcpu(const struct vcpu_state *c, char *err, size_t errlen) {
    if (c->xcrs.nr_xcrs > KVM_MAX_XCRS || c->xcrs.flags) return failf(err, errlen, "state.bin: XCR count out of range");
    if (c->mp_state.mp_state > KVM_MP_STATE_AP_RESET_HOLD) return failf(err, errlen, "state.bin: unknown MP state %u", c->mp_state.mp_state);
    return 0;
}

/* Each saved MSR must be the one the list names at its place. */
static int check_msrs(const struct snapshot_image *img, char *err, size_t errlen) {
    for (uint32_t i = 0; i < img->facts.msr_count; i++)
        if (img->msrs[i].index != img->facts.msr_index[i] || img->msrs[i].reserved)
            return failf(err, errlen, "state.bin: MSR %u is not the one its list names", i);
    return 0;
}

int snapshot_decode(const uint8_t *buf, size_t len, struct snapshot_image *img, char *err, size_t errlen) {
    struct snapshot_header h;
    struct sections sec;
    memset(img, 0, sizeof *img);
    if (check_header(buf, len, &h, err, errlen) < 0 || index_sections(buf, len, h.section_count, &sec, err, errlen) < 0) return -1;
    img->ram_size = h.ram_size;
    img->build_id_len = h.build_id_len;
    memcpy(img->build_id, h.build_id, sizeof img->build_id);
    if (take(&sec, SNAP_VM_FACTS, &img->facts, sizeof img->facts, "VM facts", err, errlen) < 0 || check_facts(&img->facts, err, errlen) < 0)
        return -1;
    uint64_t entry = sizeof img->cpuid[0], cpuid_bytes = sec.bytes[SNAP_CPUID];
    if (!sec.at[SNAP_CPUID] || !cpuid_bytes || cpuid_bytes % entry || cpuid_bytes / entry > VMM_MAX_CPUID_ENTRIES)
        return failf(err, errlen, "state.bin: CPUID missing or with an impossible entry count");
    img->cpuid_count = (uint32_t)(cpuid_bytes / entry);
    memcpy(img->cpuid, sec.at[SNAP_CPUID], cpuid_bytes);
    if (take(&sec, SNAP_VCPU, &img->vcpu, sizeof img->vcpu, "vCPU", err, errlen) < 0 || check_vcpu(&img->vcpu, err, errlen) < 0)
        return -1;
    if (!sec.at[SNAP_XSAVE] || sec.bytes[SNAP_XSAVE] != img->facts.xsave_size)
        return failf(err, errlen, "state.bin: the XSAVE section is missing or not %u bytes", img->facts.xsave_size);
    img->xsave = sec.at[SNAP_XSAVE];
    if (take(&sec, SNAP_MSRS, img->msrs, (uint64_t)img->facts.msr_count * sizeof img->msrs[0], "MSR", err, errlen) < 0 ||
        check_msrs(img, err, errlen) < 0)
        return -1;
    if (take(&sec, SNAP_VM_STATE, &img->vm, sizeof img->vm, "VM state", err, errlen) < 0) return -1;
    img->has_board = img->facts.guest_linux;
    if (img->has_board != !!sec.at[SNAP_BOARD]) return failf(err, errlen, "state.bin: device state does not match the guest kind");
    if (img->has_board && take(&sec, SNAP_BOARD, &img->board, sizeof img->board, "device", err, errlen) < 0) return -1;
    return 0;
}
