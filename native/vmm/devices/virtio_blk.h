/*
 * A read-only virtio-blk disk (virtio id 2) on the virtio-pci modern
 * transport: one request queue, VIRTIO_BLK_F_RO and VIRTIO_BLK_F_SEG_MAX
 * (a request may fill the ring), capacity from the backing file's size in
 * 512-byte sectors (a partial last sector is not offered).
 *
 * Requests (virtio 1.x, 5.2.6): a 16-byte device-readable header (type,
 * reserved, sector), then the data buffers, then one device-writable status
 * byte at the very end of the chain. Served:
 *   VIRTIO_BLK_T_IN      pread from the backing descriptor into the writable
 *                        buffers; the whole range must lie inside the disk
 *   VIRTIO_BLK_T_GET_ID  the configured id string (at most 20 bytes)
 * Everything else is answered without touching the file: OUT (a write) with
 * VIRTIO_BLK_S_IOERR, since the disk is read-only, and FLUSH and any unknown
 * type with VIRTIO_BLK_S_UNSUPP. A chain too short to hold a header and a
 * status byte is returned with nothing written. The guest is hostile: the
 * virtqueue checks every descriptor (virtq.h), and every sector and length
 * is checked here against the disk's size without overflow.
 *
 * The backing descriptor belongs to the VMM (opened O_RDONLY; the library
 * never closes it). Reads are synchronous on the calling thread: the disk is
 * a small image that the host's page cache holds.
 *
 * fork(2): the state is plain memory, the descriptor is inherited and shared
 * (pread has no file position, and nothing ever writes the disk). The child
 * calls virtio_pci_resignal(&blk->vp) once its interrupt path is ready.
 */
#ifndef CLADE_VIRTIO_BLK_H
#define CLADE_VIRTIO_BLK_H

#include <stdbool.h>
#include <stdint.h>

#include "virtio_pci.h"

#define VBLK_QUEUE_SIZE 128
#define VBLK_SECTOR_SIZE 512
#define VBLK_ID_BYTES 20
#define VBLK_MAX_BYTES (1ull << 40) /* a bigger file is refused: far above any root image */

struct virtio_blk {
    struct virtio_pci vp; /* first member */
    int fd;               /* backing file, read-only */
    uint64_t disk_bytes;  /* the file's size when set up */
    uint64_t capacity;    /* in sectors: disk_bytes / 512 */
    char id[VBLK_ID_BYTES + 1];
    uint64_t reads, errors; /* requests served and refused, for status */
    struct virtq_chain chain;
};

/*
 * Saved state (docs/vmm-devices.md, "Saved state"): plain data only. The
 * disk's size is recorded so a restore into a device set up over a
 * different file is refused; the descriptor itself is never saved.
 */
struct virtio_blk_state {
    struct virtio_pci_state vp;
    uint64_t disk_bytes;
};

/*
 * Sets up the device over fd (open for reading), whose size is disk_bytes
 * (at least one sector, at most VBLK_MAX_BYTES). id: up to 20 bytes, shown
 * to the guest as the disk's serial. Then pci_bus_add(bus, &blk->vp.pci).
 */
bool virtio_blk_init(struct virtio_blk *blk, int fd, uint64_t disk_bytes, const char *id, const struct guest_mem *mem,
                     virtio_msi_fn msi, void *msi_ctx);

void virtio_blk_save(const struct virtio_blk *blk, struct virtio_blk_state *s);
/* Loads s into a disk freshly set up over a file of the same size. False,
 * blk unchanged, on any mismatch or out-of-range value. */
bool virtio_blk_restore(struct virtio_blk *blk, const struct virtio_blk_state *s);

#endif
