#include "pci.h"

#include <string.h>

#define PCI_CLASS_BRIDGE_HOST 0x060000
#define HOST_BRIDGE_VENDOR 0x1b36 /* Red Hat, generic host bridge id */
#define HOST_BRIDGE_DEVICE 0x0008
#define BAR_TYPE_64BIT 0x4
#define BAR_MAX_SIZE (1ull << 30)
#define CONFIG_ADDRESS_MASK 0x80FFFFFCu /* enable, bus, device, function, dword register */

static void put16(struct pci_device *dev, unsigned off, uint16_t v) { pci_put_le(&dev->config[off], 2, v); }
static void put32(struct pci_device *dev, unsigned off, uint32_t v) { pci_put_le(&dev->config[off], 4, v); }

void pci_device_init(struct pci_device *dev, const struct pci_device_ops *ops, uint16_t vendor,
                     uint16_t device, uint8_t revision, uint32_t class_code, uint16_t subsys_vendor,
                     uint16_t subsys_id)
{
    memset(dev, 0, sizeof *dev);
    dev->ops = ops;
    put16(dev, PCI_VENDOR_ID, vendor);
    put16(dev, PCI_DEVICE_ID, device);
    dev->config[PCI_REVISION] = revision;
    pci_put_le(&dev->config[PCI_CLASS_PROG], 3, class_code);
    put16(dev, PCI_SUBSYSTEM_VENDOR_ID, subsys_vendor);
    put16(dev, PCI_SUBSYSTEM_ID, subsys_id);
    dev->config[PCI_INTERRUPT_LINE] = 0xff; /* no legacy interrupt routed */
    dev->config[PCI_INTERRUPT_PIN] = 0;     /* and none wired: MSI-X only */
    /* Memory decode, bus mastering and INTx-disable are the only command bits
     * with meaning here; I/O space stays off because there are no I/O BARs. */
    pci_put_le(&dev->wmask[PCI_COMMAND], 2, PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER | PCI_COMMAND_INTX_DISABLE);
    dev->wmask[0x0C] = 0xff; /* cache line size: scratch for the guest */
    dev->wmask[0x0D] = 0xff; /* latency timer: likewise */
    dev->wmask[PCI_INTERRUPT_LINE] = 0xff;
    dev->next_cap = PCI_FIRST_CAP;
}

bool pci_device_set_bar(struct pci_device *dev, int bar, uint64_t size, bool is_64bit)
{
    int slots = is_64bit ? 2 : 1;
    if (bar < 0 || bar + slots > PCI_NUM_BARS || size < 16 || size > BAR_MAX_SIZE || (size & (size - 1)))
        return false;
    dev->bar[bar] = (struct pci_bar){.size = size, .is_64bit = is_64bit};
    unsigned off = PCI_BAR0 + 4 * (unsigned)bar;
    put32(dev, off, is_64bit ? BAR_TYPE_64BIT : 0);
    /* Sizing works by itself: the guest writes all ones and reads back only
     * the bits that are writable, which are exactly the address bits. */
    pci_put_le(&dev->wmask[off], 4, (uint32_t)~(size - 1) & ~0xFu);
    if (is_64bit)
        pci_put_le(&dev->wmask[off + 4], 4, 0xFFFFFFFFu);
    return true;
}

unsigned pci_add_capability(struct pci_device *dev, uint8_t cap_id, unsigned len)
{
    unsigned off = (dev->next_cap + 3) & ~3u; /* capabilities are dword aligned */
    if (len < 2 || off + len > PCI_CONFIG_SIZE)
        return 0;
    dev->config[off] = cap_id;
    dev->config[off + 1] = 0;
    if (dev->last_cap)
        dev->config[dev->last_cap + 1] = (uint8_t)off;
    else
        dev->config[PCI_CAPABILITY_LIST] = (uint8_t)off;
    put16(dev, PCI_STATUS, pci_get_le(&dev->config[PCI_STATUS], 2) | PCI_STATUS_CAP_LIST);
    dev->last_cap = (uint8_t)off;
    dev->next_cap = off + len;
    return off;
}

uint64_t pci_bar_address(const struct pci_device *dev, int bar)
{
    unsigned off = PCI_BAR0 + 4 * (unsigned)bar;
    uint64_t addr = pci_get_le(&dev->config[off], 4) & ~0xFu;
    if (dev->bar[bar].is_64bit)
        addr |= (uint64_t)pci_get_le(&dev->config[off + 4], 4) << 32;
    return addr;
}

static void set_bar_address(struct pci_device *dev, int bar, uint64_t addr)
{
    unsigned off = PCI_BAR0 + 4 * (unsigned)bar;
    uint32_t type = dev->bar[bar].is_64bit ? BAR_TYPE_64BIT : 0;
    put32(dev, off, (uint32_t)addr | type);
    if (dev->bar[bar].is_64bit)
        put32(dev, off + 4, (uint32_t)(addr >> 32));
}

void pci_bus_init(struct pci_bus *bus, uint64_t mmio_base, uint64_t mmio_size)
{
    memset(bus, 0, sizeof *bus);
    bus->mmio_base = bus->mmio_next = mmio_base;
    bus->mmio_size = mmio_size;
    /* Linux accepts mechanism #1 once it sees a host bridge on bus 0. */
    pci_device_init(&bus->host_bridge, NULL, HOST_BRIDGE_VENDOR, HOST_BRIDGE_DEVICE, 0,
                    PCI_CLASS_BRIDGE_HOST, HOST_BRIDGE_VENDOR, 0);
    bus->slot[0] = &bus->host_bridge;
}

static bool assign_bars(struct pci_bus *bus, struct pci_device *dev)
{
    uint64_t next = bus->mmio_next;
    for (int i = 0; i < PCI_NUM_BARS; i++) {
        uint64_t size = dev->bar[i].size;
        if (!size)
            continue;
        uint64_t base = (next + size - 1) & ~(size - 1);
        if (base < bus->mmio_base || base + size > bus->mmio_base + bus->mmio_size)
            return false;
        set_bar_address(dev, i, base);
        next = base + size;
    }
    bus->mmio_next = next;
    return true;
}

int pci_bus_add(struct pci_bus *bus, struct pci_device *dev)
{
    for (int s = 1; s < PCI_MAX_DEVICES; s++) {
        if (bus->slot[s])
            continue;
        if (!assign_bars(bus, dev))
            return -1;
        uint16_t cmd = (uint16_t)pci_get_le(&dev->config[PCI_COMMAND], 2);
        put16(dev, PCI_COMMAND, cmd | PCI_COMMAND_MEMORY);
        bus->slot[s] = dev;
        return s;
    }
    return -1;
}

static bool config_access_ok(unsigned offset, unsigned len)
{
    return (len == 1 || len == 2 || len == 4) && (offset & (len - 1)) == 0 && offset + len <= PCI_CONFIG_SIZE;
}

uint32_t pci_config_read(struct pci_device *dev, unsigned offset, unsigned len)
{
    if (!config_access_ok(offset, len))
        return 0xFFFFFFFFu;
    if (dev->ops && dev->ops->config_before_read)
        dev->ops->config_before_read(dev, offset, len);
    return pci_get_le(&dev->config[offset], len);
}

void pci_config_write(struct pci_device *dev, unsigned offset, unsigned len, uint32_t value)
{
    if (!config_access_ok(offset, len))
        return;
    for (unsigned i = 0; i < len; i++) {
        uint8_t mask = dev->wmask[offset + i], byte = (uint8_t)(value >> (8 * i));
        dev->config[offset + i] = (uint8_t)((dev->config[offset + i] & ~mask) | (byte & mask));
    }
    if (dev->ops && dev->ops->config_written)
        dev->ops->config_written(dev, offset, len);
}

/* The device the 0xCF8 register selects, or NULL (bus != 0, function != 0,
 * empty slot or the enable bit clear): such reads return all ones. */
static struct pci_device *selected_device(const struct pci_bus *bus)
{
    uint32_t a = bus->config_address;
    if (!(a & 0x80000000u) || ((a >> 16) & 0xff) != 0 || ((a >> 8) & 7) != 0)
        return NULL;
    return bus->slot[(a >> 11) & 0x1f];
}

bool pci_io(struct pci_bus *bus, uint16_t port, bool is_write, uint8_t *data, unsigned size)
{
    if (port < PCI_CONFIG_ADDRESS_PORT || port > PCI_CONFIG_DATA_PORT + 3 || size == 0 || size > 4)
        return false;
    if (port < PCI_CONFIG_DATA_PORT) {
        /* Only whole-dword accesses reach the address register; byte and word
         * accesses there belong to other (absent) hardware and read as ones. */
        if (port == PCI_CONFIG_ADDRESS_PORT && size == 4) {
            if (is_write)
                bus->config_address = pci_get_le(data, 4) & CONFIG_ADDRESS_MASK;
            else
                pci_put_le(data, 4, bus->config_address);
        } else if (!is_write) {
            memset(data, 0xff, size);
        }
        return true;
    }
    struct pci_device *dev = selected_device(bus);
    unsigned offset = (bus->config_address & 0xFC) + (port - PCI_CONFIG_DATA_PORT);
    if (is_write) {
        if (dev)
            pci_config_write(dev, offset, size, pci_get_le(data, size));
    } else {
        pci_put_le(data, size, dev ? pci_config_read(dev, offset, size) : 0xFFFFFFFFu);
    }
    return true;
}

bool pci_mmio(struct pci_bus *bus, uint64_t gpa, bool is_write, uint8_t *data, unsigned len)
{
    if (len == 0 || len > 8)
        return false;
    for (int s = 1; s < PCI_MAX_DEVICES; s++) {
        struct pci_device *dev = bus->slot[s];
        if (!dev || !(pci_get_le(&dev->config[PCI_COMMAND], 2) & PCI_COMMAND_MEMORY))
            continue;
        for (int b = 0; b < PCI_NUM_BARS; b++) {
            uint64_t size = dev->bar[b].size, base = pci_bar_address(dev, b);
            if (!size || gpa < base || gpa - base >= size)
                continue;
            uint64_t offset = gpa - base;
            if (offset + len > size || !dev->ops || !dev->ops->bar_access) {
                if (!is_write)
                    memset(data, 0xff, len); /* straddles the BAR's end: ignored */
                return true;
            }
            dev->ops->bar_access(dev, b, offset, is_write, data, len);
            return true;
        }
    }
    return false;
}

/* ---- saved state -------------------------------------------------------- */

void pci_device_save(const struct pci_device *dev, struct pci_device_state *s)
{
    memcpy(s->config, dev->config, sizeof s->config);
}

/* The read-only bits of a saved config space must be those of the device it
 * goes into: they describe the device (ids, BAR types, capabilities), and a
 * change there is a damaged or forged state, not something a guest did. */
bool pci_device_restore(struct pci_device *dev, const struct pci_device_state *s)
{
    for (unsigned i = 0; i < PCI_CONFIG_SIZE; i++)
        if ((s->config[i] ^ dev->config[i]) & ~dev->wmask[i])
            return false;
    memcpy(dev->config, s->config, sizeof dev->config);
    return true;
}

void pci_bus_save(const struct pci_bus *bus, struct pci_bus_state *s)
{
    memset(s, 0, sizeof *s);
    s->config_address = bus->config_address;
    pci_device_save(&bus->host_bridge, &s->host_bridge);
}

bool pci_bus_restore(struct pci_bus *bus, const struct pci_bus_state *s)
{
    if ((s->config_address & ~CONFIG_ADDRESS_MASK) || s->reserved)
        return false;
    if (!pci_device_restore(&bus->host_bridge, &s->host_bridge))
        return false;
    bus->config_address = s->config_address;
    return true;
}
