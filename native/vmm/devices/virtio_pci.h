/*
 * The virtio-pci modern transport (virtio 1.x, section 4.1) for one device:
 * a modern-only function (vendor 0x1af4, device 0x1040 + virtio id,
 * revision 1) whose registers all live in one 64-bit memory BAR:
 *
 *   BAR0 + 0x0000  common configuration   (VIRTIO_PCI_CAP_COMMON_CFG)
 *   BAR0 + 0x1000  ISR status             (VIRTIO_PCI_CAP_ISR_CFG)
 *   BAR0 + 0x2000  device configuration   (VIRTIO_PCI_CAP_DEVICE_CFG)
 *   BAR0 + 0x3000  notifications, 4 bytes per queue (multiplier 4)
 *   BAR0 + 0x4000  MSI-X table
 *   BAR0 + 0x5000  MSI-X pending bit array
 *
 * plus the PCI-configuration-access capability the spec requires. Interrupts
 * are MSI-X messages handed to the VMM's msi callback; masked vectors are
 * remembered in the PBA and sent when unmasked. There is no INTx.
 */
#ifndef CLADE_VIRTIO_PCI_H
#define CLADE_VIRTIO_PCI_H

#include <linux/virtio_config.h>
#include <linux/virtio_pci.h>

#include "guest_mem.h"
#include "pci.h"
#include "virtq.h"

#define VIRTIO_PCI_VENDOR 0x1af4
#define VIRTIO_PCI_DEVICE_BASE 0x1040
#define VIRTIO_PCI_MAX_QUEUES 16
#define VIRTIO_PCI_MAX_VECTORS 17 /* one per queue plus configuration changes */
#define VIRTIO_PCI_BAR 0
#define VIRTIO_PCI_BAR_SIZE 0x8000

#define VIRTIO_PCI_COMMON_OFFSET 0x0000
#define VIRTIO_PCI_ISR_OFFSET 0x1000
#define VIRTIO_PCI_DEVICE_OFFSET 0x2000
#define VIRTIO_PCI_NOTIFY_OFFSET 0x3000
#define VIRTIO_PCI_MSIX_TABLE_OFFSET 0x4000
#define VIRTIO_PCI_MSIX_PBA_OFFSET 0x5000
#define VIRTIO_PCI_REGION_SIZE 0x1000
#define VIRTIO_PCI_NOTIFY_MULTIPLIER 4
#define VIRTIO_PCI_COMMON_SIZE 0x38

/* Device status bits (virtio 1.x, 2.1). */
#define VIRTIO_STATUS_ACKNOWLEDGE 1
#define VIRTIO_STATUS_DRIVER 2
#define VIRTIO_STATUS_DRIVER_OK 4
#define VIRTIO_STATUS_FEATURES_OK 8
#define VIRTIO_STATUS_NEEDS_RESET 0x40
#define VIRTIO_STATUS_FAILED 0x80

/* VIRTIO_F_VERSION_1 as a feature mask. */
#define VIRTIO_FEATURE_VERSION_1 (1ull << VIRTIO_F_VERSION_1)

/* Capability types (VIRTIO_PCI_CAP_*) and VIRTIO_MSI_NO_VECTOR come from
 * <linux/virtio_pci.h>. */

struct virtio_pci;

/* What the device behind the transport implements. */
struct virtio_device_ops {
    /* The driver wrote 0 to device_status: forget everything. */
    void (*reset)(struct virtio_pci *vp);
    /* The driver notified queue q, which is live (see virtio_pci_queue_live). */
    void (*queue_notify)(struct virtio_pci *vp, unsigned q);
    /* Device-specific configuration, offset < VIRTIO_PCI_REGION_SIZE. */
    void (*config_access)(struct virtio_pci *vp, uint64_t offset, bool is_write, uint8_t *data, unsigned len);
    /* DRIVER_OK was set: buffers may be used from now on. */
    void (*driver_ok)(struct virtio_pci *vp);
};

/* The VMM's interrupt path: deliver one MSI (KVM_SIGNAL_MSI, or an irqfd). */
typedef void (*virtio_msi_fn)(void *ctx, uint64_t addr, uint32_t data);

struct virtio_pci_queue {
    uint16_t max_size, size, msix_vector;
    bool enabled;
    uint64_t desc, driver, device; /* as written by the driver */
    struct virtq vq;
};

struct virtio_msix_entry {
    uint32_t addr_lo, addr_hi, data, control; /* control bit 0: masked */
};

struct virtio_pci {
    struct pci_device pci; /* first member: the bus hands us &vp->pci */
    const struct virtio_device_ops *ops;
    void *device; /* the device's own state, for its ops */
    const struct guest_mem *mem;
    virtio_msi_fn msi;
    void *msi_ctx;

    uint64_t device_features, driver_features;
    uint32_t device_feature_select, driver_feature_select;
    uint16_t config_msix_vector, queue_select, num_queues;
    uint8_t status, config_generation, isr;
    struct virtio_pci_queue queue[VIRTIO_PCI_MAX_QUEUES];

    uint16_t num_vectors;
    struct virtio_msix_entry msix[VIRTIO_PCI_MAX_VECTORS];
    uint32_t msix_pending; /* bit per vector: raised while masked */
    unsigned msix_cap, cfg_cap; /* config-space offsets of those capabilities */
};

struct virtio_pci_params {
    uint16_t virtio_id;       /* 3 for a console */
    uint32_t class_code;      /* PCI class for the function */
    uint64_t device_features; /* VIRTIO_F_VERSION_1 is always added */
    uint16_t num_queues;      /* <= VIRTIO_PCI_MAX_QUEUES */
    uint16_t queue_max_size;  /* power of two <= VIRTQ_MAX_SIZE */
};

/* Sets the function up (config header, capabilities, BAR). false on bad
 * parameters. Then plug it in with pci_bus_add(bus, &vp->pci). */
bool virtio_pci_init(struct virtio_pci *vp, const struct virtio_pci_params *params,
                     const struct virtio_device_ops *ops, void *device, const struct guest_mem *mem,
                     virtio_msi_fn msi, void *msi_ctx);

/*
 * Saved state (docs/vmm-devices.md, "Saved state"): plain data only. The
 * callbacks, the device pointer and guest memory are the ones of the
 * transport it is restored into, set up by virtio_pci_init with the same
 * parameters as the one saved.
 */
struct virtio_pci_queue_state {
    uint64_t desc, driver, device;
    uint16_t size, msix_vector;
    uint8_t enabled;
    uint8_t reserved[3]; /* 0 */
    struct virtq_state vq;
};

struct virtio_pci_state {
    struct pci_device_state pci;
    uint64_t driver_features;
    uint32_t device_feature_select, driver_feature_select;
    uint32_t msix_pending;
    uint16_t config_msix_vector, queue_select, num_queues, num_vectors;
    uint8_t status, config_generation, isr;
    uint8_t reserved; /* 0 */
    struct virtio_pci_queue_state queue[VIRTIO_PCI_MAX_QUEUES];
    struct virtio_msix_entry msix[VIRTIO_PCI_MAX_VECTORS];
};

void virtio_pci_save(const struct virtio_pci *vp, struct virtio_pci_state *s);
/* Loads s into a freshly initialised transport. Every value is checked: enabled
 * queues must lie in guest RAM (as when the driver enabled them), vectors
 * exist, the status is one the driver could have reached. False on any
 * violation, with vp unchanged. Sends no interrupt: see virtio_pci_resignal. */
bool virtio_pci_restore(struct virtio_pci *vp, const struct virtio_pci_state *s);

/* Whether queue q may be used now: DRIVER_OK, not failed or needing reset,
 * bus mastering on, the queue enabled and intact. */
bool virtio_pci_queue_live(const struct virtio_pci *vp, unsigned q);
struct virtq *virtio_pci_vq(struct virtio_pci *vp, unsigned q);

/* After pushing used buffers on q: interrupts the guest unless it asked not to. */
void virtio_pci_queue_used(struct virtio_pci *vp, unsigned q);

/* Something about the device is wrong (e.g. a queue's ring was invalid):
 * sets DEVICE_NEEDS_RESET and sends a configuration interrupt. */
void virtio_pci_needs_reset(struct virtio_pci *vp);

/* After fork(2), in the child, once its interrupt path works: re-sends the
 * configuration vector and every enabled queue's vector (or marks them pending
 * if masked). Spurious virtio interrupts are harmless; a lost one would
 * stall a queue, and an MSI in flight during the fork may belong to the
 * parent's irqchip only. */
void virtio_pci_resignal(struct virtio_pci *vp);

#endif
