#include "virtio_pci.h"

#include <string.h>

#define PCI_CAP_ID_VENDOR 0x09
#define PCI_CAP_ID_MSIX 0x11
#define MSIX_CONTROL_ENABLE 0x8000
#define MSIX_CONTROL_MASKALL 0x4000
#define MSIX_ENTRY_SIZE 16
#define MSIX_ENTRY_MASKED 1
#define ISR_QUEUE 1
#define ISR_CONFIG 2

/* Common configuration register offsets (virtio 1.x, 4.1.4.3). */
enum {
    CC_DFSELECT = 0x00,
    CC_DF = 0x04,
    CC_GFSELECT = 0x08,
    CC_GF = 0x0C,
    CC_MSIX = 0x10,
    CC_NUMQ = 0x12,
    CC_STATUS = 0x14,
    CC_CFGGEN = 0x15,
    CC_Q_SELECT = 0x16,
    CC_Q_SIZE = 0x18,
    CC_Q_MSIX = 0x1A,
    CC_Q_ENABLE = 0x1C,
    CC_Q_NOFF = 0x1E,
    CC_Q_DESC = 0x20,
    CC_Q_DRIVER = 0x28,
    CC_Q_DEVICE = 0x30,
};

static struct virtio_pci *to_vp(struct pci_device *dev) { return (struct virtio_pci *)dev; }

/* ---- MSI-X ------------------------------------------------------------ */

static uint16_t msix_control(const struct virtio_pci *vp)
{
    return (uint16_t)pci_get_le(&vp->pci.config[vp->msix_cap + 2], 2);
}

static bool msix_enabled(const struct virtio_pci *vp) { return msix_control(vp) & MSIX_CONTROL_ENABLE; }

static bool vector_masked(const struct virtio_pci *vp, uint16_t v)
{
    return (msix_control(vp) & MSIX_CONTROL_MASKALL) || (vp->msix[v].control & MSIX_ENTRY_MASKED);
}

static void send_vector(struct virtio_pci *vp, uint16_t v)
{
    const struct virtio_msix_entry *e = &vp->msix[v];
    vp->msi(vp->msi_ctx, (uint64_t)e->addr_hi << 32 | e->addr_lo, e->data);
}

/* Raises vector v, or records it as pending while it is masked. Without
 * MSI-X enabled there is nowhere to deliver to (no INTx): the ISR bit the
 * caller set is all the driver gets. */
static void raise_vector(struct virtio_pci *vp, uint16_t v)
{
    if (v >= vp->num_vectors || !msix_enabled(vp))
        return;
    if (vector_masked(vp, v))
        vp->msix_pending |= 1u << v;
    else
        send_vector(vp, v);
}

/* Called whenever a mask may have been lifted. */
static void deliver_pending(struct virtio_pci *vp)
{
    if (!msix_enabled(vp))
        return;
    for (uint16_t v = 0; v < vp->num_vectors; v++) {
        if ((vp->msix_pending & (1u << v)) && !vector_masked(vp, v)) {
            vp->msix_pending &= ~(1u << v);
            send_vector(vp, v);
        }
    }
}

static void msix_table_access(struct virtio_pci *vp, uint64_t off, bool is_write, uint8_t *data, unsigned len)
{
    /* The spec allows only aligned dword or qword accesses to the table. */
    if ((len != 4 && len != 8) || (off & (len - 1)) || off + len > (uint64_t)vp->num_vectors * MSIX_ENTRY_SIZE) {
        if (!is_write)
            memset(data, 0xff, len);
        return;
    }
    uint8_t *table = (uint8_t *)vp->msix;
    if (!is_write) {
        memcpy(data, table + off, len);
        return;
    }
    memcpy(table + off, data, len);
    for (uint16_t v = 0; v < vp->num_vectors; v++)
        vp->msix[v].control &= MSIX_ENTRY_MASKED; /* other bits are reserved */
    deliver_pending(vp);
}

static void msix_pba_read(struct virtio_pci *vp, uint64_t off, uint8_t *data, unsigned len)
{
    for (unsigned i = 0; i < len; i++)
        data[i] = off + i < 4 ? (uint8_t)(vp->msix_pending >> (8 * (off + i))) : 0;
}

/* ---- queue and status ------------------------------------------------- */

static struct virtio_pci_queue *selected_queue(struct virtio_pci *vp)
{
    return vp->queue_select < vp->num_queues ? &vp->queue[vp->queue_select] : NULL;
}

static uint16_t valid_vector(const struct virtio_pci *vp, uint16_t v)
{
    /* Reading back NO_VECTOR is how the driver learns a vector was refused. */
    return v < vp->num_vectors ? v : VIRTIO_MSI_NO_VECTOR;
}

static void device_reset(struct virtio_pci *vp)
{
    vp->driver_features = 0;
    vp->device_feature_select = vp->driver_feature_select = 0;
    vp->config_msix_vector = VIRTIO_MSI_NO_VECTOR;
    vp->queue_select = 0;
    vp->status = 0;
    vp->isr = 0;
    for (unsigned i = 0; i < vp->num_queues; i++) {
        struct virtio_pci_queue *q = &vp->queue[i];
        uint16_t max = q->max_size;
        memset(q, 0, sizeof *q);
        q->max_size = q->size = max;
        q->msix_vector = VIRTIO_MSI_NO_VECTOR;
    }
    /* MSI-X table and pending bits are PCI function state, not virtio
     * state: a virtio reset leaves them alone. */
    if (vp->ops->reset)
        vp->ops->reset(vp);
}

static void queue_enable(struct virtio_pci *vp, struct virtio_pci_queue *q)
{
    if (q->enabled)
        return;
    if (!virtq_setup(&q->vq, vp->mem, q->size, q->max_size, q->desc, q->driver, q->device)) {
        virtio_pci_needs_reset(vp); /* bad size or ring address: refuse, visibly */
        return;
    }
    q->enabled = true;
}

static bool features_acceptable(const struct virtio_pci *vp)
{
    return (vp->driver_features & ~vp->device_features) == 0 && (vp->driver_features & VIRTIO_FEATURE_VERSION_1);
}

static void status_write(struct virtio_pci *vp, uint8_t value)
{
    if (value == 0) {
        device_reset(vp);
        return;
    }
    uint8_t old = vp->status;
    if ((value & VIRTIO_STATUS_FEATURES_OK) && !(old & VIRTIO_STATUS_FEATURES_OK) && !features_acceptable(vp))
        value &= (uint8_t)~VIRTIO_STATUS_FEATURES_OK; /* the driver re-reads and gives up */
    if ((value & VIRTIO_STATUS_DRIVER_OK) && !(value & VIRTIO_STATUS_FEATURES_OK))
        value &= (uint8_t)~VIRTIO_STATUS_DRIVER_OK; /* no running without agreed features */
    vp->status = (uint8_t)(value | (old & VIRTIO_STATUS_NEEDS_RESET));
    if ((vp->status & VIRTIO_STATUS_DRIVER_OK) && !(old & VIRTIO_STATUS_DRIVER_OK) && vp->ops->driver_ok)
        vp->ops->driver_ok(vp);
}

/* ---- common configuration -------------------------------------------- */

/* The register block as the driver sees it, laid out in bytes: reads of any
 * width or alignment are then just a copy. */
static void common_image(struct virtio_pci *vp, uint8_t img[VIRTIO_PCI_COMMON_SIZE])
{
    memset(img, 0, VIRTIO_PCI_COMMON_SIZE);
    struct virtio_pci_queue *q = selected_queue(vp);
    pci_put_le(img + CC_DFSELECT, 4, vp->device_feature_select);
    if (vp->device_feature_select < 2)
        pci_put_le(img + CC_DF, 4, vp->device_features >> (32 * vp->device_feature_select));
    pci_put_le(img + CC_GFSELECT, 4, vp->driver_feature_select);
    if (vp->driver_feature_select < 2)
        pci_put_le(img + CC_GF, 4, vp->driver_features >> (32 * vp->driver_feature_select));
    pci_put_le(img + CC_MSIX, 2, vp->config_msix_vector);
    pci_put_le(img + CC_NUMQ, 2, vp->num_queues);
    img[CC_STATUS] = vp->status;
    img[CC_CFGGEN] = vp->config_generation;
    pci_put_le(img + CC_Q_SELECT, 2, vp->queue_select);
    if (!q)
        return; /* an absent queue reads as size 0 */
    pci_put_le(img + CC_Q_SIZE, 2, q->size);
    pci_put_le(img + CC_Q_MSIX, 2, q->msix_vector);
    pci_put_le(img + CC_Q_ENABLE, 2, q->enabled);
    pci_put_le(img + CC_Q_NOFF, 2, vp->queue_select);
    pci_put_le(img + CC_Q_DESC, 8, q->desc);
    pci_put_le(img + CC_Q_DRIVER, 8, q->driver);
    pci_put_le(img + CC_Q_DEVICE, 8, q->device);
}

/* A 64-bit queue address written whole or as either 32-bit half. */
static void queue_address_write(struct virtio_pci_queue *q, uint64_t off, const uint8_t *data, unsigned len)
{
    uint64_t *field = off < CC_Q_DRIVER ? &q->desc : off < CC_Q_DEVICE ? &q->driver : &q->device;
    unsigned shift = (off & 4) ? 32 : 0;
    uint64_t mask = len == 8 ? ~0ull : 0xFFFFFFFFull << shift;
    uint64_t value = len == 8 ? (uint64_t)pci_get_le(data, 4) | (uint64_t)pci_get_le(data + 4, 4) << 32
                              : (uint64_t)pci_get_le(data, 4) << shift;
    *field = (*field & ~mask) | (value & mask);
}

static void driver_features_write(struct virtio_pci *vp, uint32_t value)
{
    if ((vp->status & VIRTIO_STATUS_FEATURES_OK) || vp->driver_feature_select >= 2)
        return; /* frozen once accepted */
    unsigned shift = 32 * vp->driver_feature_select;
    vp->driver_features = (vp->driver_features & ~(0xFFFFFFFFull << shift)) | (uint64_t)value << shift;
}

static void queue_register_write(struct virtio_pci *vp, uint64_t off, const uint8_t *data, unsigned len)
{
    struct virtio_pci_queue *q = selected_queue(vp);
    if (!q)
        return;
    if (off == CC_Q_MSIX && len == 2) {
        q->msix_vector = valid_vector(vp, (uint16_t)pci_get_le(data, 2));
        return;
    }
    if (q->enabled)
        return; /* layout is fixed while the queue runs; disabling needs a reset */
    if (off == CC_Q_SIZE && len == 2)
        q->size = (uint16_t)pci_get_le(data, 2); /* checked when enabled */
    else if (off == CC_Q_ENABLE && len == 2 && pci_get_le(data, 2) == 1)
        queue_enable(vp, q);
    else if (off >= CC_Q_DESC && off < VIRTIO_PCI_COMMON_SIZE && (len == 4 || len == 8) && !(off & (len - 1)))
        queue_address_write(q, off, data, len);
}

static void common_write(struct virtio_pci *vp, uint64_t off, const uint8_t *data, unsigned len)
{
    uint32_t v = pci_get_le(data, len > 4 ? 4 : len);
    if (off == CC_DFSELECT && len == 4)
        vp->device_feature_select = v;
    else if (off == CC_GFSELECT && len == 4)
        vp->driver_feature_select = v;
    else if (off == CC_GF && len == 4)
        driver_features_write(vp, v);
    else if (off == CC_MSIX && len == 2)
        vp->config_msix_vector = valid_vector(vp, (uint16_t)v);
    else if (off == CC_STATUS && len == 1)
        status_write(vp, (uint8_t)v);
    else if (off == CC_Q_SELECT && len == 2)
        vp->queue_select = (uint16_t)v;
    else if (off >= CC_Q_SIZE)
        queue_register_write(vp, off, data, len);
    /* Anything else is read-only or a malformed access: ignored. */
}

static void common_access(struct virtio_pci *vp, uint64_t off, bool is_write, uint8_t *data, unsigned len)
{
    if (is_write) {
        common_write(vp, off, data, len);
        return;
    }
    uint8_t img[VIRTIO_PCI_COMMON_SIZE];
    common_image(vp, img);
    for (unsigned i = 0; i < len; i++)
        data[i] = off + i < VIRTIO_PCI_COMMON_SIZE ? img[off + i] : 0;
}

/* ---- BAR dispatch ----------------------------------------------------- */

static void notify_write(struct virtio_pci *vp, uint64_t off, unsigned len)
{
    if ((len != 2 && len != 4) || off % VIRTIO_PCI_NOTIFY_MULTIPLIER)
        return;
    unsigned q = (unsigned)(off / VIRTIO_PCI_NOTIFY_MULTIPLIER);
    if (q < vp->num_queues && virtio_pci_queue_live(vp, q))
        vp->ops->queue_notify(vp, q);
}

static void bar_access(struct pci_device *dev, int bar, uint64_t offset, bool is_write, uint8_t *data, unsigned len)
{
    struct virtio_pci *vp = to_vp(dev);
    uint64_t region = offset & ~(uint64_t)(VIRTIO_PCI_REGION_SIZE - 1), off = offset - region;
    if (bar != VIRTIO_PCI_BAR || off + len > VIRTIO_PCI_REGION_SIZE) {
        if (!is_write)
            memset(data, 0xff, len); /* straddles two regions */
        return;
    }
    if (!is_write)
        memset(data, 0, len);
    switch (region) {
    case VIRTIO_PCI_COMMON_OFFSET:
        common_access(vp, off, is_write, data, len);
        break;
    case VIRTIO_PCI_ISR_OFFSET:
        if (!is_write && off == 0) {
            data[0] = vp->isr; /* reading acknowledges */
            vp->isr = 0;
        }
        break;
    case VIRTIO_PCI_DEVICE_OFFSET:
        if (vp->ops->config_access)
            vp->ops->config_access(vp, off, is_write, data, len);
        break;
    case VIRTIO_PCI_NOTIFY_OFFSET:
        if (is_write)
            notify_write(vp, off, len);
        break;
    case VIRTIO_PCI_MSIX_TABLE_OFFSET:
        msix_table_access(vp, off, is_write, data, len);
        break;
    case VIRTIO_PCI_MSIX_PBA_OFFSET:
        if (!is_write)
            msix_pba_read(vp, off, data, len);
        break;
    }
}

/* ---- PCI configuration access capability ----------------------------- */

/* Layout of that capability: the generic virtio_pci_cap, then 4 data bytes. */
enum { CFGCAP_BAR = 4, CFGCAP_OFFSET = 8, CFGCAP_LENGTH = 12, CFGCAP_DATA = 16, CFGCAP_SIZE = 20 };

/* The window the capability currently describes, if it is a valid one. */
static bool cfg_window(struct virtio_pci *vp, uint64_t *offset, unsigned *len)
{
    const uint8_t *cap = &vp->pci.config[vp->cfg_cap];
    uint32_t off = pci_get_le(cap + CFGCAP_OFFSET, 4), length = pci_get_le(cap + CFGCAP_LENGTH, 4);
    if (cap[CFGCAP_BAR] != VIRTIO_PCI_BAR || (length != 1 && length != 2 && length != 4) || (off & (length - 1)) ||
        off + length > VIRTIO_PCI_BAR_SIZE)
        return false;
    *offset = off;
    *len = length;
    return true;
}

static bool touches(unsigned a, unsigned alen, unsigned b, unsigned blen) { return a < b + blen && b < a + alen; }

static void config_written(struct pci_device *dev, unsigned offset, unsigned len)
{
    struct virtio_pci *vp = to_vp(dev);
    uint64_t off;
    unsigned n;
    if (touches(offset, len, vp->msix_cap + 2, 2))
        deliver_pending(vp); /* enable set or function mask cleared */
    if (touches(offset, len, vp->cfg_cap + CFGCAP_DATA, 4) && cfg_window(vp, &off, &n))
        bar_access(dev, VIRTIO_PCI_BAR, off, true, &dev->config[vp->cfg_cap + CFGCAP_DATA], n);
}

static void config_before_read(struct pci_device *dev, unsigned offset, unsigned len)
{
    struct virtio_pci *vp = to_vp(dev);
    uint64_t off;
    unsigned n;
    if (touches(offset, len, vp->cfg_cap + CFGCAP_DATA, 4) && cfg_window(vp, &off, &n))
        bar_access(dev, VIRTIO_PCI_BAR, off, false, &dev->config[vp->cfg_cap + CFGCAP_DATA], n);
}

static const struct pci_device_ops virtio_pci_ops = {
    .bar_access = bar_access,
    .config_written = config_written,
    .config_before_read = config_before_read,
};

/* ---- setup ------------------------------------------------------------ */

static bool add_virtio_cap(struct virtio_pci *vp, uint8_t type, unsigned len, uint32_t offset, uint32_t length,
                           unsigned *at)
{
    unsigned cap = pci_add_capability(&vp->pci, PCI_CAP_ID_VENDOR, len);
    if (!cap)
        return false;
    uint8_t *c = &vp->pci.config[cap];
    c[2] = (uint8_t)len;
    c[3] = type;
    c[4] = VIRTIO_PCI_BAR;
    pci_put_le(c + 8, 4, offset);
    pci_put_le(c + 12, 4, length);
    if (at)
        *at = cap;
    return true;
}

static bool add_capabilities(struct virtio_pci *vp)
{
    unsigned notify, msix;
    if (!add_virtio_cap(vp, VIRTIO_PCI_CAP_COMMON_CFG, 16, VIRTIO_PCI_COMMON_OFFSET, VIRTIO_PCI_COMMON_SIZE, NULL) ||
        !add_virtio_cap(vp, VIRTIO_PCI_CAP_NOTIFY_CFG, 20, VIRTIO_PCI_NOTIFY_OFFSET,
                        VIRTIO_PCI_NOTIFY_MULTIPLIER * vp->num_queues, &notify) ||
        !add_virtio_cap(vp, VIRTIO_PCI_CAP_ISR_CFG, 16, VIRTIO_PCI_ISR_OFFSET, 1, NULL) ||
        !add_virtio_cap(vp, VIRTIO_PCI_CAP_DEVICE_CFG, 16, VIRTIO_PCI_DEVICE_OFFSET, VIRTIO_PCI_REGION_SIZE, NULL) ||
        !add_virtio_cap(vp, VIRTIO_PCI_CAP_PCI_CFG, CFGCAP_SIZE, 0, 0, &vp->cfg_cap))
        return false;
    pci_put_le(&vp->pci.config[notify + 16], 4, VIRTIO_PCI_NOTIFY_MULTIPLIER);
    uint8_t *wm = &vp->pci.wmask[vp->cfg_cap];
    wm[CFGCAP_BAR] = 0xff;
    memset(wm + CFGCAP_OFFSET, 0xff, 12); /* offset, length, data */

    if (!(msix = pci_add_capability(&vp->pci, PCI_CAP_ID_MSIX, 12)))
        return false;
    vp->msix_cap = msix;
    pci_put_le(&vp->pci.config[msix + 2], 2, vp->num_vectors - 1u); /* table size - 1 */
    pci_put_le(&vp->pci.config[msix + 4], 4, VIRTIO_PCI_MSIX_TABLE_OFFSET | VIRTIO_PCI_BAR);
    pci_put_le(&vp->pci.config[msix + 8], 4, VIRTIO_PCI_MSIX_PBA_OFFSET | VIRTIO_PCI_BAR);
    vp->pci.wmask[msix + 3] = (MSIX_CONTROL_ENABLE | MSIX_CONTROL_MASKALL) >> 8;
    return true;
}

bool virtio_pci_init(struct virtio_pci *vp, const struct virtio_pci_params *p, const struct virtio_device_ops *ops,
                     void *device, const struct guest_mem *mem, virtio_msi_fn msi, void *msi_ctx)
{
    if (!p->num_queues || p->num_queues > VIRTIO_PCI_MAX_QUEUES || !p->queue_max_size ||
        p->queue_max_size > VIRTQ_MAX_SIZE || (p->queue_max_size & (p->queue_max_size - 1)) || !ops ||
        !ops->queue_notify || !msi)
        return false;
    memset(vp, 0, sizeof *vp);
    pci_device_init(&vp->pci, &virtio_pci_ops, VIRTIO_PCI_VENDOR, (uint16_t)(VIRTIO_PCI_DEVICE_BASE + p->virtio_id),
                    1 /* modern-only */, p->class_code, VIRTIO_PCI_VENDOR, 0x40);
    vp->ops = ops;
    vp->device = device;
    vp->mem = mem;
    vp->msi = msi;
    vp->msi_ctx = msi_ctx;
    vp->device_features = p->device_features | VIRTIO_FEATURE_VERSION_1;
    vp->num_queues = p->num_queues;
    vp->num_vectors = (uint16_t)(p->num_queues + 1);
    for (unsigned i = 0; i < vp->num_queues; i++)
        vp->queue[i].max_size = p->queue_max_size;
    for (unsigned v = 0; v < vp->num_vectors; v++)
        vp->msix[v].control = MSIX_ENTRY_MASKED; /* masked after PCI reset */
    if (!pci_device_set_bar(&vp->pci, VIRTIO_PCI_BAR, VIRTIO_PCI_BAR_SIZE, true) || !add_capabilities(vp))
        return false;
    device_reset(vp);
    return true;
}

/* ---- device-facing helpers ------------------------------------------- */

bool virtio_pci_queue_live(const struct virtio_pci *vp, unsigned q)
{
    uint16_t cmd = (uint16_t)pci_get_le(&vp->pci.config[PCI_COMMAND], 2);
    return q < vp->num_queues && (vp->status & VIRTIO_STATUS_DRIVER_OK) &&
           !(vp->status & (VIRTIO_STATUS_NEEDS_RESET | VIRTIO_STATUS_FAILED)) && (cmd & PCI_COMMAND_MASTER) &&
           vp->queue[q].enabled && !vp->queue[q].vq.broken;
}

struct virtq *virtio_pci_vq(struct virtio_pci *vp, unsigned q) { return &vp->queue[q].vq; }

void virtio_pci_queue_used(struct virtio_pci *vp, unsigned q)
{
    if (q >= vp->num_queues || !virtq_wants_interrupt(&vp->queue[q].vq))
        return;
    vp->isr |= ISR_QUEUE;
    raise_vector(vp, vp->queue[q].msix_vector);
}

void virtio_pci_needs_reset(struct virtio_pci *vp)
{
    if (vp->status & VIRTIO_STATUS_NEEDS_RESET)
        return;
    vp->status |= VIRTIO_STATUS_NEEDS_RESET;
    /* The spec asks for a configuration-change notification once the driver
     * is running, so that it notices. */
    if (vp->status & VIRTIO_STATUS_DRIVER_OK) {
        vp->isr |= ISR_CONFIG;
        raise_vector(vp, vp->config_msix_vector);
    }
}

void virtio_pci_resignal(struct virtio_pci *vp)
{
    if (!(vp->status & VIRTIO_STATUS_DRIVER_OK))
        return;
    if (vp->status & VIRTIO_STATUS_NEEDS_RESET)
        raise_vector(vp, vp->config_msix_vector);
    for (unsigned q = 0; q < vp->num_queues; q++)
        if (vp->queue[q].enabled)
            raise_vector(vp, vp->queue[q].msix_vector);
    deliver_pending(vp);
}

/* ---- saved state -------------------------------------------------------- */

_Static_assert(sizeof(struct virtio_pci_queue_state) == 40, "no implicit padding in saved state");
_Static_assert(sizeof(struct virtio_pci_state) == 1200, "no implicit padding in saved state");

void virtio_pci_save(const struct virtio_pci *vp, struct virtio_pci_state *s)
{
    memset(s, 0, sizeof *s);
    pci_device_save(&vp->pci, &s->pci);
    s->driver_features = vp->driver_features;
    s->device_feature_select = vp->device_feature_select;
    s->driver_feature_select = vp->driver_feature_select;
    s->msix_pending = vp->msix_pending;
    s->config_msix_vector = vp->config_msix_vector;
    s->queue_select = vp->queue_select;
    s->num_queues = vp->num_queues;
    s->num_vectors = vp->num_vectors;
    s->status = vp->status;
    s->config_generation = vp->config_generation;
    s->isr = vp->isr;
    for (unsigned i = 0; i < vp->num_queues; i++) {
        const struct virtio_pci_queue *q = &vp->queue[i];
        struct virtio_pci_queue_state *qs = &s->queue[i];
        qs->desc = q->desc, qs->driver = q->driver, qs->device = q->device;
        qs->size = q->size, qs->msix_vector = q->msix_vector, qs->enabled = q->enabled;
        virtq_save(&q->vq, &qs->vq);
    }
    memcpy(s->msix, vp->msix, vp->num_vectors * sizeof vp->msix[0]);
}

static bool all_zero(const void *p, size_t n)
{
    const uint8_t *b = p;
    for (size_t i = 0; i < n; i++)
        if (b[i])
            return false;
    return true;
}

static bool vector_ok(const struct virtio_pci *vp, uint16_t v) { return valid_vector(vp, v) == v; }

/* A status the driver could have reached through status_write. */
static bool status_ok(const struct virtio_pci *vp, uint8_t status)
{
    if ((status & VIRTIO_STATUS_DRIVER_OK) && !(status & VIRTIO_STATUS_FEATURES_OK))
        return false;
    return !(status & VIRTIO_STATUS_FEATURES_OK) || features_acceptable(vp);
}

static bool queue_restore(struct virtio_pci *vp, struct virtio_pci_queue *q, const struct virtio_pci_queue_state *qs)
{
    if (!vector_ok(vp, qs->msix_vector) || qs->enabled > 1 || !all_zero(qs->reserved, sizeof qs->reserved))
        return false;
    q->desc = qs->desc, q->driver = qs->driver, q->device = qs->device;
    q->size = qs->size, q->msix_vector = qs->msix_vector, q->enabled = qs->enabled;
    virtq_reset(&q->vq);
    if (!q->enabled) /* a disabled queue's rings were never accepted: nothing of them may be saved */
        return all_zero(&qs->vq, sizeof qs->vq);
    /* The same checks as when the driver enabled it: size, alignment, rings inside guest RAM. */
    return virtq_setup(&q->vq, vp->mem, q->size, q->max_size, q->desc, q->driver, q->device) && virtq_restore(&q->vq, &qs->vq);
}

bool virtio_pci_restore(struct virtio_pci *vp, const struct virtio_pci_state *s)
{
    struct virtio_pci t = *vp; /* built up aside: vp stays as it was on failure */
    if (s->num_queues != t.num_queues || s->num_vectors != t.num_vectors || s->reserved || (s->isr & ~(ISR_QUEUE | ISR_CONFIG)) ||
        (s->msix_pending >> t.num_vectors) || !vector_ok(&t, s->config_msix_vector))
        return false;
    if (!pci_device_restore(&t.pci, &s->pci))
        return false;
    t.driver_features = s->driver_features;
    if (!status_ok(&t, s->status))
        return false;
    t.device_feature_select = s->device_feature_select;
    t.driver_feature_select = s->driver_feature_select;
    t.msix_pending = s->msix_pending;
    t.config_msix_vector = s->config_msix_vector;
    t.queue_select = s->queue_select;
    t.status = s->status;
    t.config_generation = s->config_generation;
    t.isr = s->isr;
    for (unsigned i = 0; i < VIRTIO_PCI_MAX_QUEUES; i++) {
        if (i >= t.num_queues ? !all_zero(&s->queue[i], sizeof s->queue[i]) : !queue_restore(&t, &t.queue[i], &s->queue[i]))
            return false;
    }
    for (unsigned v = 0; v < VIRTIO_PCI_MAX_VECTORS; v++) {
        if (v >= t.num_vectors ? !all_zero(&s->msix[v], sizeof s->msix[v]) : (s->msix[v].control & ~(uint32_t)MSIX_ENTRY_MASKED))
            return false;
        if (v < t.num_vectors)
            t.msix[v] = s->msix[v];
    }
    *vp = t;
    return true;
}
