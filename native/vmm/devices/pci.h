/*
 * A tiny PCI bus 0: a host bridge at 00:00.0 and up to 31 single-function
 * endpoint devices, reached with configuration mechanism #1 (I/O ports
 * 0xCF8 address, 0xCFC-0xCFF data). Memory BARs are placed by pci_bus_add()
 * inside an MMIO window the VMM chooses, as firmware would, and the guest may
 * size and move them afterwards. No I/O BARs, no INTx: devices interrupt with
 * MSI-X only (interrupt pin 0).
 *
 * The VMM calls pci_io() from KVM_EXIT_IO and pci_mmio() from KVM_EXIT_MMIO.
 * All state is plain memory, so a fork(2)ed child continues with it as is.
 */
#ifndef CLADE_PCI_H
#define CLADE_PCI_H

#include <stdbool.h>
#include <stdint.h>

#define PCI_CONFIG_ADDRESS_PORT 0xCF8
#define PCI_CONFIG_DATA_PORT 0xCFC
#define PCI_MAX_DEVICES 32
#define PCI_NUM_BARS 6
#define PCI_CONFIG_SIZE 256

/* Standard header offsets the bus itself needs. */
#define PCI_VENDOR_ID 0x00
#define PCI_DEVICE_ID 0x02
#define PCI_COMMAND 0x04
#define PCI_STATUS 0x06
#define PCI_REVISION 0x08
#define PCI_CLASS_PROG 0x09
#define PCI_HEADER_TYPE 0x0E
#define PCI_BAR0 0x10
#define PCI_SUBSYSTEM_VENDOR_ID 0x2C
#define PCI_SUBSYSTEM_ID 0x2E
#define PCI_CAPABILITY_LIST 0x34
#define PCI_INTERRUPT_LINE 0x3C
#define PCI_INTERRUPT_PIN 0x3D
#define PCI_FIRST_CAP 0x40

#define PCI_COMMAND_MEMORY 0x0002
#define PCI_COMMAND_MASTER 0x0004
#define PCI_COMMAND_INTX_DISABLE 0x0400
#define PCI_STATUS_CAP_LIST 0x0010

struct pci_device;

/* Per-device behaviour. Every hook is optional. */
struct pci_device_ops {
    /* A guest access of len (1..8) bytes at offset inside memory BAR bar.
     * The bus guarantees offset + len <= the BAR's size. On a read, fill data. */
    void (*bar_access)(struct pci_device *dev, int bar, uint64_t offset, bool is_write, uint8_t *data,
                       unsigned len);
    /* Called after the bus stored a config-space write (already masked). */
    void (*config_written)(struct pci_device *dev, unsigned offset, unsigned len);
    /* Called before a config-space read: a device with side-effecting
     * registers refreshes dev->config here. */
    void (*config_before_read)(struct pci_device *dev, unsigned offset, unsigned len);
};

struct pci_bar {
    uint64_t size; /* power of two >= 16; 0: BAR unused */
    bool is_64bit; /* occupies this slot and the next */
};

struct pci_device {
    uint8_t config[PCI_CONFIG_SIZE]; /* what the guest reads */
    uint8_t wmask[PCI_CONFIG_SIZE];  /* bits the guest may change */
    struct pci_bar bar[PCI_NUM_BARS];
    const struct pci_device_ops *ops;
    unsigned next_cap; /* where pci_add_capability() puts the next one */
    uint8_t last_cap;  /* 0 or the offset of the last capability added */
};

struct pci_bus {
    struct pci_device host_bridge;
    struct pci_device *slot[PCI_MAX_DEVICES]; /* slot[0] is the host bridge */
    uint32_t config_address;                  /* the 0xCF8 register */
    uint64_t mmio_base, mmio_size, mmio_next; /* window for BARs */
};

/* The bus with its host bridge; BARs are placed in [mmio_base, mmio_base+mmio_size). */
void pci_bus_init(struct pci_bus *bus, uint64_t mmio_base, uint64_t mmio_size);

/* Fills a type-0 header: ids, class (24 bits: class, subclass, prog-if). */
void pci_device_init(struct pci_device *dev, const struct pci_device_ops *ops, uint16_t vendor,
                     uint16_t device, uint8_t revision, uint32_t class_code, uint16_t subsys_vendor,
                     uint16_t subsys_id);

/* Declares a memory BAR (before pci_bus_add). size: power of two, >= 16. */
bool pci_device_set_bar(struct pci_device *dev, int bar, uint64_t size, bool is_64bit);

/* Appends a capability of len bytes (>= 2) with the given id; returns its
 * config offset (the body after id/next is left zero) or 0 if it does not fit. */
unsigned pci_add_capability(struct pci_device *dev, uint8_t cap_id, unsigned len);

/* Plugs dev into the first free slot, assigns its BARs in the window and
 * enables memory decoding. Returns the slot number or -1. */
int pci_bus_add(struct pci_bus *bus, struct pci_device *dev);

/* The guest-physical base of a memory BAR as currently programmed. */
uint64_t pci_bar_address(const struct pci_device *dev, int bar);

/*
 * Saved state (docs/vmm-devices.md, "Saved state"): plain data, no pointers.
 * Only what the guest can change is saved; everything else (BAR sizes,
 * write masks, capabilities, callbacks) comes from the init calls of the
 * device it is restored into, which must be the same as those of the device
 * it was saved from.
 */
struct pci_device_state {
    uint8_t config[PCI_CONFIG_SIZE];
};

struct pci_bus_state {
    uint32_t config_address;
    uint32_t reserved; /* 0 */
    struct pci_device_state host_bridge;
};

void pci_device_save(const struct pci_device *dev, struct pci_device_state *s);
/* False, dev unchanged, if s differs from dev in a bit the guest cannot write. */
bool pci_device_restore(struct pci_device *dev, const struct pci_device_state *s);
void pci_bus_save(const struct pci_bus *bus, struct pci_bus_state *s);
/* The bus's own state and the host bridge's; devices in other slots restore their own. */
bool pci_bus_restore(struct pci_bus *bus, const struct pci_bus_state *s);

/* KVM_EXIT_IO for ports 0xCF8-0xCFF: returns false for any other port. size
 * is 1, 2 or 4; data is the little-endian buffer in kvm_run. */
bool pci_io(struct pci_bus *bus, uint16_t port, bool is_write, uint8_t *data, unsigned size);

/* KVM_EXIT_MMIO: true if a BAR claimed gpa (reads then filled data). */
bool pci_mmio(struct pci_bus *bus, uint64_t gpa, bool is_write, uint8_t *data, unsigned len);

/* Config space access by slot, as the 0xCFC port does (exposed for tests and
 * for the virtio PCI-configuration-access capability). */
uint32_t pci_config_read(struct pci_device *dev, unsigned offset, unsigned len);
void pci_config_write(struct pci_device *dev, unsigned offset, unsigned len, uint32_t value);

/* Little-endian helpers over byte arrays. */
static inline uint32_t pci_get_le(const uint8_t *p, unsigned len)
{
    uint32_t v = 0;
    for (unsigned i = 0; i < len; i++)
        v |= (uint32_t)p[i] << (8 * i);
    return v;
}
static inline void pci_put_le(uint8_t *p, unsigned len, uint64_t v)
{
    for (unsigned i = 0; i < len; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

#endif
