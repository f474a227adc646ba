#include "virtio_blk.h"

#include <errno.h>
#include <linux/virtio_blk.h>
#include <string.h>
#include <unistd.h>

#define VIRTIO_ID_BLOCK 2
#define PCI_CLASS_STORAGE_SCSI 0x010000
#define REQUEST_QUEUE 0
#define HEADER_BYTES 16 /* le32 type, le32 reserved, le64 sector */
#define CONFIG_SIZE 16  /* capacity, size_max (not offered: 0), seg_max */
/* Segments per request: the ring must hold a whole request (header and status too) without indirect descriptors. */
#define SEG_MAX (VBLK_QUEUE_SIZE - 2)

static struct virtio_blk *to_blk(struct virtio_pci *vp) { return (struct virtio_blk *)vp; }

/* Copies the first len readable bytes of the chain; false if it has fewer. */
static bool read_header(const struct virtq_chain *c, uint8_t *dst, size_t len)
{
    size_t done = 0;
    for (unsigned i = 0; i < c->n_out && done < len; i++) {
        size_t n = c->seg[i].iov_len < len - done ? c->seg[i].iov_len : len - done;
        memcpy(dst + done, c->seg[i].iov_base, n);
        done += n;
    }
    return done == len;
}

/* The status byte: the last byte of the last writable segment. */
static uint8_t *status_byte(const struct virtq_chain *c)
{
    const struct iovec *last = &c->seg[c->n_out + c->n_in - 1];
    return (uint8_t *)last->iov_base + last->iov_len - 1;
}

/*
 * Calls fn on each piece of the writable part except its final status byte,
 * in order, with the offset of that piece within the data; stops at the
 * first failure.
 */
typedef bool (*piece_fn)(struct virtio_blk *blk, uint8_t *dst, size_t len, uint64_t data_off, uint64_t arg);

static bool for_each_data_piece(struct virtio_blk *blk, const struct virtq_chain *c, uint64_t data_bytes, piece_fn fn,
                                uint64_t arg)
{
    uint64_t off = 0;
    for (unsigned i = c->n_out; i < c->n_out + c->n_in && off < data_bytes; i++) {
        uint64_t n = c->seg[i].iov_len < data_bytes - off ? c->seg[i].iov_len : data_bytes - off;
        if (!fn(blk, c->seg[i].iov_base, (size_t)n, off, arg))
            return false;
        off += n;
    }
    return true;
}

static bool read_piece(struct virtio_blk *blk, uint8_t *dst, size_t len, uint64_t data_off, uint64_t disk_off)
{
    size_t done = 0;
    while (done < len) {
        ssize_t n = pread(blk->fd, dst + done, len - done, (off_t)(disk_off + data_off + done));
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return false; /* an error, or the file shrank under us */
        done += (size_t)n;
    }
    return true;
}

static bool id_piece(struct virtio_blk *blk, uint8_t *dst, size_t len, uint64_t data_off, uint64_t unused)
{
    (void)unused;
    for (size_t i = 0; i < len; i++)
        dst[i] = data_off + i < VBLK_ID_BYTES ? (uint8_t)blk->id[data_off + i] : 0; /* id[] is NUL-padded */
    return true;
}

/* A read of data_bytes at sector: inside the disk, checked without overflow. */
static bool read_in_range(const struct virtio_blk *blk, uint64_t sector, uint64_t data_bytes)
{
    if (sector > blk->capacity)
        return false;
    return data_bytes <= (blk->capacity - sector) * VBLK_SECTOR_SIZE;
}

/* Serves one request; returns the bytes written into the chain (data and status). */
static uint32_t serve(struct virtio_blk *blk, const struct virtq_chain *c)
{
    uint8_t hdr[HEADER_BYTES];
    if (c->n_in == 0 || !read_header(c, hdr, sizeof hdr)) {
        blk->errors++;
        return 0; /* nowhere to put a status, or no request: returned untouched */
    }
    uint32_t type = pci_get_le(hdr, 4);
    uint64_t sector = pci_get_le(hdr + 8, 4) | (uint64_t)pci_get_le(hdr + 12, 4) << 32;
    uint64_t data_bytes = c->in_bytes - 1; /* in_bytes <= UINT32_MAX (virtq_pop) */
    uint8_t status = VIRTIO_BLK_S_OK;
    uint32_t written = 1;
    if (type == VIRTIO_BLK_T_IN) {
        if (!read_in_range(blk, sector, data_bytes) ||
            !for_each_data_piece(blk, c, data_bytes, read_piece, sector * VBLK_SECTOR_SIZE))
            status = VIRTIO_BLK_S_IOERR;
        else
            written += (uint32_t)data_bytes;
    } else if (type == VIRTIO_BLK_T_GET_ID) {
        uint64_t n = data_bytes < VBLK_ID_BYTES ? data_bytes : VBLK_ID_BYTES;
        for_each_data_piece(blk, c, n, id_piece, 0);
        written += (uint32_t)n;
    } else {
        status = type == VIRTIO_BLK_T_OUT ? VIRTIO_BLK_S_IOERR : VIRTIO_BLK_S_UNSUPP; /* read-only; no flush offered */
    }
    if (status == VIRTIO_BLK_S_OK)
        blk->reads++;
    else
        blk->errors++;
    *status_byte(c) = status;
    return written;
}

static void process_queue(struct virtio_blk *blk)
{
    struct virtq *vq = virtio_pci_vq(&blk->vp, REQUEST_QUEUE);
    bool used = false;
    while (virtio_pci_queue_live(&blk->vp, REQUEST_QUEUE)) {
        int r = virtq_pop(vq, &blk->chain);
        if (r < 0)
            virtio_pci_needs_reset(&blk->vp);
        if (r <= 0)
            break;
        virtq_push(vq, blk->chain.head, serve(blk, &blk->chain));
        used = true;
    }
    if (used)
        virtio_pci_queue_used(&blk->vp, REQUEST_QUEUE);
}

/* ---- transport hooks -------------------------------------------------- */

static void queue_notify(struct virtio_pci *vp, unsigned q)
{
    if (q == REQUEST_QUEUE)
        process_queue(to_blk(vp));
}

static void config_access(struct virtio_pci *vp, uint64_t off, bool is_write, uint8_t *data, unsigned len)
{
    if (is_write)
        return; /* nothing in the configuration is writable without WCE or the like */
    uint8_t cfg[CONFIG_SIZE];
    memset(cfg, 0, sizeof cfg);
    pci_put_le(cfg, 8, to_blk(vp)->capacity);
    pci_put_le(cfg + 12, 4, SEG_MAX);
    for (unsigned i = 0; i < len; i++)
        data[i] = off + i < CONFIG_SIZE ? cfg[off + i] : 0;
}

static void device_reset(struct virtio_pci *vp) { (void)vp; /* no state beyond the transport's */ }

static void driver_ok(struct virtio_pci *vp) { process_queue(to_blk(vp)); /* requests posted before DRIVER_OK */ }

static const struct virtio_device_ops blk_ops = {
    .reset = device_reset,
    .queue_notify = queue_notify,
    .config_access = config_access,
    .driver_ok = driver_ok,
};

/* ---- public API ------------------------------------------------------- */

bool virtio_blk_init(struct virtio_blk *blk, int fd, uint64_t disk_bytes, const char *id, const struct guest_mem *mem,
                     virtio_msi_fn msi, void *msi_ctx)
{
    memset(blk, 0, sizeof *blk);
    blk->fd = -1;
    if (fd < 0 || disk_bytes < VBLK_SECTOR_SIZE || disk_bytes > VBLK_MAX_BYTES || (id && strlen(id) > VBLK_ID_BYTES))
        return false;
    blk->fd = fd;
    blk->disk_bytes = disk_bytes;
    blk->capacity = disk_bytes / VBLK_SECTOR_SIZE;
    if (id)
        memcpy(blk->id, id, strlen(id));
    struct virtio_pci_params params = {
        .virtio_id = VIRTIO_ID_BLOCK,
        .class_code = PCI_CLASS_STORAGE_SCSI,
        /* Without SEG_MAX Linux sends one segment per request: every 4 KiB page its own exit. */
        .device_features = 1ull << VIRTIO_BLK_F_RO | 1ull << VIRTIO_BLK_F_SEG_MAX,
        .num_queues = 1,
        .queue_max_size = VBLK_QUEUE_SIZE,
    };
    return virtio_pci_init(&blk->vp, &params, &blk_ops, blk, mem, msi, msi_ctx);
}

/* ---- saved state -------------------------------------------------------- */

_Static_assert(sizeof(struct virtio_blk_state) == sizeof(struct virtio_pci_state) + 8, "no implicit padding in saved state");

void virtio_blk_save(const struct virtio_blk *blk, struct virtio_blk_state *s)
{
    memset(s, 0, sizeof *s);
    virtio_pci_save(&blk->vp, &s->vp); /* no chain is ever held between calls: nothing to give back */
    s->disk_bytes = blk->disk_bytes;
}

bool virtio_blk_restore(struct virtio_blk *blk, const struct virtio_blk_state *s)
{
    if (s->disk_bytes != blk->disk_bytes)
        return false;
    return virtio_pci_restore(&blk->vp, &s->vp);
}
