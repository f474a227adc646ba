/*
 * A minimal virtio-pci guest driver over fake guest RAM, shared by the unit
 * test and the fuzzers: it reaches the devices only through pci_io() and
 * pci_mmio(), as the guest would through KVM exits.
 */
#ifndef CLADE_TEST_DRIVER_H
#define CLADE_TEST_DRIVER_H

#include <stdbool.h>
#include <stdint.h>

#include "../cmos.h"
#include "../guest_mem.h"
#include "../pci.h"
#include "../virtio_blk.h"
#include "../virtio_console.h"
#include "../virtio_net.h"

#define DRV_RAM_SIZE (1u << 20)
#define DRV_MMIO_BASE 0xC0000000ull
#define DRV_MMIO_SIZE 0x10000000ull
#define DRV_QSIZE 64
#define DRV_MAX_MSI 4096

struct drv_queue {
    uint16_t size, avail_idx, last_used, next_desc;
    uint64_t desc, avail, used;
};

struct drv {
    uint8_t *ram;
    struct guest_mem mem;
    struct pci_bus bus;
    struct virtio_console con;
    struct virtio_blk blk; /* on a bus of its own: drv_create_blk */
    struct virtio_net net; /* on a bus of its own: drv_create_net */
    unsigned slot;
    uint64_t bar, common, notify, isr, devcfg, msix_table, pba;
    uint32_t notify_mult;
    unsigned msix_cap, cfg_cap;
    struct drv_queue q[VIRTIO_PCI_MAX_QUEUES];
    uint64_t data_next; /* bump allocator for buffers */
    unsigned msi_count;
    uint32_t msi_data[DRV_MAX_MSI];
};

void drv_msi(void *ctx, uint64_t addr, uint32_t data);

uint32_t drv_cfg_read(struct drv *d, unsigned slot, unsigned off, unsigned len);
void drv_cfg_write(struct drv *d, unsigned slot, unsigned off, unsigned len, uint32_t v);
uint64_t drv_mr(struct drv *d, uint64_t gpa, unsigned len);
void drv_mw(struct drv *d, uint64_t gpa, unsigned len, uint64_t v);

/* Creates RAM, the bus and a console with ports {console, "org.clade.agent"}. */
bool drv_create(struct drv *d, uint8_t *ram);
/* Creates RAM and a bus with only a read-only disk over fd (disk_bytes long). */
bool drv_create_blk(struct drv *d, uint8_t *ram, int fd, uint64_t disk_bytes);
/* Creates RAM and a bus with only a NIC (MAC 52:54:00:c1:ad:0f), disconnected. */
bool drv_create_net(struct drv *d, uint8_t *ram);
/* Finds the console, maps its capabilities, enables MSI-X. */
bool drv_probe(struct drv *d);
/* The same for the virtio device with PCI device id device_id (0x1042: the disk, 0x1041: the NIC). */
bool drv_probe_device(struct drv *d, uint16_t device_id);
/* reset .. DRIVER_OK with all queues set up; false if the device refused. */
bool drv_start(struct drv *d, uint64_t features);

uint16_t drv_status(struct drv *d);
uint64_t drv_alloc(struct drv *d, uint32_t len);
/* Posts one chain: n buffers, the first `out` device-readable. */
void drv_add(struct drv *d, unsigned q, const uint64_t *addr, const uint32_t *len, unsigned n, unsigned out);
void drv_kick(struct drv *d, unsigned q);
/* Next used element: true and id/len if there is one. */
bool drv_used(struct drv *d, unsigned q, uint32_t *id, uint32_t *len);
void drv_send_control(struct drv *d, uint32_t id, uint16_t event, uint16_t value);

#endif
