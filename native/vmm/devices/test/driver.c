#include "driver.h"

#include <string.h>

#include "../virtio_pci.h"

void drv_msi(void *ctx, uint64_t addr, uint32_t data)
{
    struct drv *d = ctx;
    (void)addr;
    if (d->msi_count < DRV_MAX_MSI)
        d->msi_data[d->msi_count] = data;
    d->msi_count++;
}

static uint32_t io(struct drv *d, uint16_t port, bool w, unsigned len, uint32_t v)
{
    uint8_t buf[4];
    pci_put_le(buf, 4, v);
    pci_io(&d->bus, port, w, buf, len);
    return pci_get_le(buf, len);
}

uint32_t drv_cfg_read(struct drv *d, unsigned slot, unsigned off, unsigned len)
{
    io(d, 0xCF8, true, 4, 0x80000000u | slot << 11 | (off & 0xFC));
    return io(d, (uint16_t)(0xCFC + (off & 3)), false, len, 0);
}

void drv_cfg_write(struct drv *d, unsigned slot, unsigned off, unsigned len, uint32_t v)
{
    io(d, 0xCF8, true, 4, 0x80000000u | slot << 11 | (off & 0xFC));
    io(d, (uint16_t)(0xCFC + (off & 3)), true, len, v);
}

uint64_t drv_mr(struct drv *d, uint64_t gpa, unsigned len)
{
    uint8_t buf[8] = {0};
    if (!pci_mmio(&d->bus, gpa, false, buf, len))
        return ~0ull;
    uint64_t v = 0;
    memcpy(&v, buf, len);
    return v;
}

void drv_mw(struct drv *d, uint64_t gpa, unsigned len, uint64_t v)
{
    uint8_t buf[8];
    memcpy(buf, &v, 8);
    pci_mmio(&d->bus, gpa, true, buf, len);
}

bool drv_create(struct drv *d, uint8_t *ram)
{
    memset(d, 0, sizeof *d);
    d->ram = ram;
    if (!guest_mem_add(&d->mem, 0, DRV_RAM_SIZE, ram))
        return false;
    pci_bus_init(&d->bus, DRV_MMIO_BASE, DRV_MMIO_SIZE);
    struct virtio_console_port_spec ports[2] = {{.name = NULL, .is_console = true},
                                                {.name = "org.clade.agent", .is_console = false}};
    if (!virtio_console_init(&d->con, ports, 2, &d->mem, drv_msi, d))
        return false;
    return pci_bus_add(&d->bus, &d->con.vp.pci) > 0;
}

static uint64_t bar_base(struct drv *d, unsigned bar)
{
    uint32_t lo = drv_cfg_read(d, d->slot, PCI_BAR0 + 4 * bar, 4);
    uint64_t base = lo & ~0xFu;
    if ((lo & 6) == 4)
        base |= (uint64_t)drv_cfg_read(d, d->slot, PCI_BAR0 + 4 * bar + 4, 4) << 32;
    return base;
}

static void map_cap(struct drv *d, unsigned cap)
{
    uint8_t type = (uint8_t)drv_cfg_read(d, d->slot, cap + 3, 1);
    uint8_t bar = (uint8_t)drv_cfg_read(d, d->slot, cap + 4, 1);
    uint64_t at = bar_base(d, bar) + drv_cfg_read(d, d->slot, cap + 8, 4);
    if (type == VIRTIO_PCI_CAP_COMMON_CFG)
        d->common = at;
    else if (type == VIRTIO_PCI_CAP_NOTIFY_CFG) {
        d->notify = at;
        d->notify_mult = drv_cfg_read(d, d->slot, cap + 16, 4);
    } else if (type == VIRTIO_PCI_CAP_ISR_CFG)
        d->isr = at;
    else if (type == VIRTIO_PCI_CAP_DEVICE_CFG)
        d->devcfg = at;
    else if (type == VIRTIO_PCI_CAP_PCI_CFG)
        d->cfg_cap = cap;
}

bool drv_create_blk(struct drv *d, uint8_t *ram, int fd, uint64_t disk_bytes)
{
    memset(d, 0, sizeof *d);
    d->ram = ram;
    if (!guest_mem_add(&d->mem, 0, DRV_RAM_SIZE, ram))
        return false;
    pci_bus_init(&d->bus, DRV_MMIO_BASE, DRV_MMIO_SIZE);
    if (!virtio_blk_init(&d->blk, fd, disk_bytes, "clade-test-disk", &d->mem, drv_msi, d))
        return false;
    return pci_bus_add(&d->bus, &d->blk.vp.pci) > 0;
}

bool drv_create_net(struct drv *d, uint8_t *ram)
{
    static const uint8_t mac[6] = {0x52, 0x54, 0x00, 0xc1, 0xad, 0x0f};
    memset(d, 0, sizeof *d);
    d->ram = ram;
    if (!guest_mem_add(&d->mem, 0, DRV_RAM_SIZE, ram))
        return false;
    pci_bus_init(&d->bus, DRV_MMIO_BASE, DRV_MMIO_SIZE);
    if (!virtio_net_init(&d->net, mac, &d->mem, drv_msi, d))
        return false;
    return pci_bus_add(&d->bus, &d->net.vp.pci) > 0;
}

bool drv_probe(struct drv *d) { return drv_probe_device(d, 0x1043); }

bool drv_probe_device(struct drv *d, uint16_t device_id)
{
    d->slot = 0;
    for (unsigned s = 0; s < 32 && !d->slot; s++)
        if (drv_cfg_read(d, s, 0, 4) == ((uint32_t)device_id << 16 | 0x1af4))
            d->slot = s;
    if (!d->slot)
        return false;
    unsigned guard = 0;
    for (unsigned cap = drv_cfg_read(d, d->slot, PCI_CAPABILITY_LIST, 1); cap && guard < 48; guard++) {
        uint8_t id = (uint8_t)drv_cfg_read(d, d->slot, cap, 1);
        if (id == 0x09)
            map_cap(d, cap);
        if (id == 0x11) {
            d->msix_cap = cap;
            uint32_t table = drv_cfg_read(d, d->slot, cap + 4, 4), pba = drv_cfg_read(d, d->slot, cap + 8, 4);
            d->msix_table = bar_base(d, table & 7) + (table & ~7u);
            d->pba = bar_base(d, pba & 7) + (pba & ~7u);
        }
        cap = drv_cfg_read(d, d->slot, cap + 1, 1);
    }
    if (!d->common || !d->notify || !d->isr || !d->devcfg || !d->msix_cap)
        return false;
    drv_cfg_write(d, d->slot, PCI_COMMAND, 2, PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER);
    unsigned nvec = (drv_cfg_read(d, d->slot, d->msix_cap + 2, 2) & 0x7ff) + 1;
    for (unsigned v = 0; v < nvec; v++) {
        drv_mw(d, d->msix_table + 16 * v, 4, 0xFEE00000u);
        drv_mw(d, d->msix_table + 16 * v + 4, 4, 0);
        drv_mw(d, d->msix_table + 16 * v + 8, 4, 0x30 + v);
        drv_mw(d, d->msix_table + 16 * v + 12, 4, 0); /* unmask */
    }
    drv_cfg_write(d, d->slot, d->msix_cap + 2, 2, 0x8000);
    return true;
}

uint16_t drv_status(struct drv *d) { return (uint16_t)drv_mr(d, d->common + 0x14, 1); }

static void setup_queue(struct drv *d, unsigned i)
{
    struct drv_queue *q = &d->q[i];
    memset(q, 0, sizeof *q);
    q->size = DRV_QSIZE;
    q->desc = 0x10000 + 0x2000ull * i;
    q->avail = q->desc + 0x800;
    q->used = q->desc + 0x1000;
    memset(d->ram + q->desc, 0, 0x2000);
    drv_mw(d, d->common + 0x16, 2, i);
    drv_mw(d, d->common + 0x18, 2, q->size);
    drv_mw(d, d->common + 0x1A, 2, i + 1); /* vector 0 is for configuration */
    drv_mw(d, d->common + 0x20, 4, (uint32_t)q->desc);
    drv_mw(d, d->common + 0x24, 4, q->desc >> 32);
    drv_mw(d, d->common + 0x28, 8, q->avail);
    drv_mw(d, d->common + 0x30, 4, (uint32_t)q->used);
    drv_mw(d, d->common + 0x34, 4, q->used >> 32);
    drv_mw(d, d->common + 0x1C, 2, 1);
}

bool drv_start(struct drv *d, uint64_t features)
{
    drv_mw(d, d->common + 0x14, 1, 0);
    drv_mw(d, d->common + 0x14, 1, VIRTIO_STATUS_ACKNOWLEDGE);
    drv_mw(d, d->common + 0x14, 1, VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER);
    drv_mw(d, d->common + 0x08, 4, 0);
    drv_mw(d, d->common + 0x0C, 4, (uint32_t)features);
    drv_mw(d, d->common + 0x08, 4, 1);
    drv_mw(d, d->common + 0x0C, 4, features >> 32);
    drv_mw(d, d->common + 0x14, 1, 0x0B);
    if (!(drv_status(d) & VIRTIO_STATUS_FEATURES_OK))
        return false;
    drv_mw(d, d->common + 0x10, 2, 0);
    unsigned nq = (unsigned)drv_mr(d, d->common + 0x12, 2);
    for (unsigned i = 0; i < nq && i < VIRTIO_PCI_MAX_QUEUES; i++)
        setup_queue(d, i);
    d->data_next = 0x80000;
    drv_mw(d, d->common + 0x14, 1, 0x0F);
    return drv_status(d) == 0x0F;
}

uint64_t drv_alloc(struct drv *d, uint32_t len)
{
    if (d->data_next + len > DRV_RAM_SIZE)
        d->data_next = 0x80000; /* tests recycle the data area */
    uint64_t at = d->data_next;
    d->data_next += (len + 15) & ~15u;
    return at;
}

void drv_add(struct drv *d, unsigned qi, const uint64_t *addr, const uint32_t *len, unsigned n, unsigned out)
{
    struct drv_queue *q = &d->q[qi];
    uint16_t head = q->next_desc;
    for (unsigned i = 0; i < n; i++) {
        uint16_t at = (uint16_t)((head + i) % q->size);
        uint8_t *desc = d->ram + q->desc + 16 * at;
        uint16_t flags = (uint16_t)((i + 1 < n ? VIRTQ_DESC_F_NEXT : 0) | (i >= out ? VIRTQ_DESC_F_WRITE : 0));
        uint16_t next = (uint16_t)((at + 1) % q->size);
        memcpy(desc, &addr[i], 8);
        memcpy(desc + 8, &len[i], 4);
        memcpy(desc + 12, &flags, 2);
        memcpy(desc + 14, &next, 2);
    }
    q->next_desc = (uint16_t)((head + n) % q->size);
    memcpy(d->ram + q->avail + 4 + 2 * (q->avail_idx % q->size), &head, 2);
    q->avail_idx++;
    __atomic_store_n((uint16_t *)(d->ram + q->avail + 2), q->avail_idx, __ATOMIC_RELEASE);
}

void drv_kick(struct drv *d, unsigned q) { drv_mw(d, d->notify + (uint64_t)d->notify_mult * q, 2, q); }

bool drv_used(struct drv *d, unsigned qi, uint32_t *id, uint32_t *len)
{
    struct drv_queue *q = &d->q[qi];
    uint16_t idx = __atomic_load_n((uint16_t *)(d->ram + q->used + 2), __ATOMIC_ACQUIRE);
    if (idx == q->last_used)
        return false;
    const uint8_t *e = d->ram + q->used + 4 + 8 * (q->last_used % q->size);
    memcpy(id, e, 4);
    memcpy(len, e + 4, 4);
    q->last_used++;
    return true;
}

void drv_send_control(struct drv *d, uint32_t id, uint16_t event, uint16_t value)
{
    uint64_t at = drv_alloc(d, 8);
    memcpy(d->ram + at, &id, 4);
    memcpy(d->ram + at + 4, &event, 2);
    memcpy(d->ram + at + 6, &value, 2);
    uint32_t len = 8;
    drv_add(d, 3, &at, &len, 1, 1);
    drv_kick(d, 3);
}
