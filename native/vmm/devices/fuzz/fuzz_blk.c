/*
 * Fuzz target: the read-only disk, from a running driver. The input is a
 * program: scribble on the request queue's rings and descriptors, post
 * well-formed requests of any type, sector and length (writes included),
 * kick any queue, poke the BAR and config space, reset and restart. After
 * every program the backing file must be unchanged.
 */
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "../test/driver.h"

#define DISK_BYTES (16 * 512 + 77)
#define FEATURES (VIRTIO_FEATURE_VERSION_1 | 1ull << 5 /* VIRTIO_BLK_F_RO */)

struct input {
    const uint8_t *p;
    size_t left;
};

static uint64_t take(struct input *in, unsigned bytes)
{
    uint64_t v = 0;
    for (unsigned i = 0; i < bytes && in->left; i++, in->p++, in->left--)
        v |= (uint64_t)*in->p << (8 * i);
    return v;
}

static uint8_t *ram;
static int disk_fd = -1;
static uint8_t disk_copy[DISK_BYTES];
static struct drv D;

static void once(void)
{
    if (ram)
        return;
    ram = aligned_alloc(4096, DRV_RAM_SIZE);
    int fd = memfd_create("clade-fuzz-disk", MFD_CLOEXEC);
    for (unsigned i = 0; i < DISK_BYTES; i++)
        disk_copy[i] = (uint8_t)(i * 13 + 1);
    if (fd < 0 || write(fd, disk_copy, DISK_BYTES) != DISK_BYTES)
        abort();
    char self[64];
    snprintf(self, sizeof self, "/proc/self/fd/%d", fd);
    disk_fd = open(self, O_RDONLY | O_CLOEXEC);
    close(fd);
    if (disk_fd < 0)
        abort();
}

static void op_request(struct drv *d, struct input *in)
{
    uint32_t type = (uint32_t)take(in, 1);
    uint64_t sector = take(in, 1) & 0x80 ? take(in, 8) : take(in, 1) % 20;
    unsigned n = 1 + (unsigned)take(in, 1) % 5, out = 1 + (unsigned)take(in, 1) % n;
    uint64_t addr[6] = {drv_alloc(d, 16)};
    uint32_t len[6] = {16};
    uint8_t hdr[16] = {0};
    pci_put_le(hdr, 4, type == 255 ? 0xFFFFFFFFu : type % 12);
    pci_put_le(hdr + 8, 8, sector);
    memcpy(ram + addr[0], hdr, 16);
    for (unsigned i = 1; i <= n && i < 6; i++) {
        len[i] = (uint32_t)take(in, 2) % 4200;
        addr[i] = drv_alloc(d, len[i]);
    }
    unsigned count = n + 1 < 6 ? n + 1 : 6;
    if (d->q[0].size)
        drv_add(d, 0, addr, len, count, out);
}

static void op_desc(struct drv *d, struct input *in)
{
    if (!d->q[0].size)
        return;
    uint16_t i = (uint16_t)(take(in, 1) % d->q[0].size);
    uint8_t *desc = ram + d->q[0].desc + 16 * i;
    uint64_t addr = take(in, 1) & 1 ? take(in, 8) : 0x80000 + take(in, 2);
    uint32_t len = take(in, 1) & 1 ? (uint32_t)take(in, 4) : (uint32_t)take(in, 2);
    uint16_t flags = (uint16_t)take(in, 1), next = (uint16_t)take(in, 1);
    memcpy(desc, &addr, 8);
    memcpy(desc + 8, &len, 4);
    memcpy(desc + 12, &flags, 2);
    memcpy(desc + 14, &next, 2);
}

static void op_publish(struct drv *d, struct input *in)
{
    struct drv_queue *q = &d->q[0];
    if (!q->size)
        return;
    uint16_t head = (uint16_t)take(in, 1);
    memcpy(ram + q->avail + 4 + 2 * (q->avail_idx % q->size), &head, 2);
    q->avail_idx = (uint16_t)(q->avail_idx + (take(in, 1) & 1 ? 1 : (uint16_t)take(in, 2)));
    memcpy(ram + q->avail + 2, &q->avail_idx, 2);
}

static void op_mmio(struct drv *d, struct input *in, bool wr)
{
    uint64_t bar = pci_bar_address(&d->blk.vp.pci, VIRTIO_PCI_BAR);
    uint64_t off = take(in, 2) % (VIRTIO_PCI_BAR_SIZE + 16);
    unsigned w = 1u << (take(in, 1) & 3);
    uint64_t v = take(in, 8);
    uint8_t data[8];
    memcpy(data, &v, 8);
    pci_mmio(&d->bus, bar + off, wr, data, w);
}

static void op_config(struct drv *d, struct input *in, bool wr)
{
    unsigned w = 1u << (take(in, 1) % 3), off = (unsigned)take(in, 1) & ~(w - 1);
    uint32_t v = (uint32_t)take(in, 4);
    if (wr && off >= PCI_BAR0 && off < PCI_BAR0 + 8)
        return; /* keep the BAR in place so MMIO stays reachable */
    if (wr)
        drv_cfg_write(d, d->slot, off, w, v);
    else
        drv_cfg_read(d, d->slot, off, w);
}

static void run_op(struct drv *d, struct input *in)
{
    uint32_t id, len;
    switch (take(in, 1) % 9) {
    case 0: op_request(d, in); break;
    case 1: op_desc(d, in); break;
    case 2: op_publish(d, in); break;
    case 3: drv_kick(d, (unsigned)take(in, 1) % 3); break;
    case 4: op_mmio(d, in, true); break;
    case 5: op_mmio(d, in, false); break;
    case 6: op_config(d, in, take(in, 1) & 1); break;
    case 7: while (d->q[0].size && drv_used(d, 0, &id, &len)) {} break;
    default: if (take(in, 1) & 1) drv_start(d, take(in, 1) & 1 ? FEATURES : take(in, 8)); else virtio_pci_resignal(&d->blk.vp); break;
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    once();
    memset(ram, 0, DRV_RAM_SIZE);
    if (!drv_create_blk(&D, ram, disk_fd, DISK_BYTES) || !drv_probe_device(&D, 0x1042) || !drv_start(&D, FEATURES))
        abort();
    struct input in = {data, size};
    for (unsigned steps = 0; in.left && steps < 512; steps++)
        run_op(&D, &in);
    uint8_t now[DISK_BYTES];
    if (pread(disk_fd, now, DISK_BYTES, 0) != DISK_BYTES || memcmp(now, disk_copy, DISK_BYTES))
        abort(); /* the guest must never change the disk */
    return 0;
}
