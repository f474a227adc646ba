#include "virtio_net.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/virtio_net.h>
#include <poll.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define VIRTIO_ID_NET 1
#define PCI_CLASS_NETWORK_ETHERNET 0x020000
#define CONFIG_SIZE 10 /* mac[6], le16 status, le16 max_virtqueue_pairs */
#define NUM_BUFFERS_OFFSET 10 /* in virtio_net_hdr_v1 */

static struct virtio_net *to_net(struct virtio_pci *vp) { return (struct virtio_net *)vp; }

/* A pop that turns a hostile ring into DEVICE_NEEDS_RESET. */
static int pop(struct virtio_net *net, unsigned q)
{
    int r = virtq_pop(virtio_pci_vq(&net->vp, q), &net->chain);
    if (r < 0)
        virtio_pci_needs_reset(&net->vp);
    return r;
}

/* ---- the host end ----------------------------------------------------- */

static void reset_stream(struct virtio_net *net)
{
    net->out_start = net->out_len = 0;
    net->in_start = net->in_len = 0;
}

/* The host end is unusable (EOF, an error, or a broken stream): let it go for the VMM to close. */
static void hang_up(struct virtio_net *net, const char *reason)
{
    if (net->fd < 0)
        return;
    if (net->hungup_fd < 0)
        net->hungup_fd = net->fd;
    net->hangup_reason = reason;
    net->fd = -1;
    reset_stream(net);
}

/* Writes queued frames; false while the socket is full. */
static bool flush_out(struct virtio_net *net)
{
    while (net->out_len > 0 && net->fd >= 0) {
        /* MSG_NOSIGNAL: a vanished peer must not kill the VMM with SIGPIPE. */
        ssize_t n = send(net->fd, net->out + net->out_start, net->out_len, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n > 0) {
            net->out_start += (size_t)n;
            net->out_len -= (size_t)n;
        } else if (n < 0 && errno == EINTR) {
            continue;
        } else if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            return false;
        } else {
            hang_up(net, "the network socket refused a write");
        }
    }
    if (net->out_len == 0)
        net->out_start = 0;
    return true;
}

/* Room at the end of the output buffer, compacting it first if that helps. */
static size_t out_room(struct virtio_net *net)
{
    if (net->out_start > 0 && net->out_start + net->out_len > VNET_TX_BUF_SIZE / 2) {
        memmove(net->out, net->out + net->out_start, net->out_len);
        net->out_start = 0;
    }
    return VNET_TX_BUF_SIZE - net->out_start - net->out_len;
}

/* ---- transmit ----------------------------------------------------------- */

/* Copies len readable bytes of the chain from skip on into dst (the caller checked they exist). */
static void chain_read(const struct virtq_chain *c, uint64_t skip, uint8_t *dst, size_t len)
{
    size_t done = 0;
    for (unsigned i = 0; i < c->n_out && done < len; i++) {
        size_t seg = c->seg[i].iov_len;
        if (skip >= seg) {
            skip -= seg;
            continue;
        }
        size_t n = seg - skip < len - done ? seg - skip : len - done;
        memcpy(dst + done, (uint8_t *)c->seg[i].iov_base + skip, n);
        done += n;
        skip = 0;
    }
}

static void put_be32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)(v >> 24), p[1] = (uint8_t)(v >> 16), p[2] = (uint8_t)(v >> 8), p[3] = (uint8_t)v;
}

static uint32_t get_be32(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

enum tx_result { TX_TAKEN, TX_NO_ROOM };

/* One popped transmit chain: queued with its prefix, or dropped when malformed or nobody listens. */
static enum tx_result take_tx_chain(struct virtio_net *net)
{
    const struct virtq_chain *c = &net->chain;
    if (c->out_bytes < VNET_HDR_BYTES + VNET_MIN_FRAME || c->out_bytes > VNET_HDR_BYTES + VNET_MAX_FRAME || net->fd < 0) {
        net->tx_dropped++;
        return TX_TAKEN;
    }
    size_t frame = (size_t)c->out_bytes - VNET_HDR_BYTES;
    if (out_room(net) < VNET_PREFIX_BYTES + frame)
        return TX_NO_ROOM;
    uint8_t *dst = net->out + net->out_start + net->out_len;
    put_be32(dst, (uint32_t)frame);
    chain_read(c, VNET_HDR_BYTES, dst + VNET_PREFIX_BYTES, frame);
    net->out_len += VNET_PREFIX_BYTES + frame;
    net->tx_frames++;
    return TX_TAKEN;
}

static void pump_tx(struct virtio_net *net)
{
    struct virtq *vq = virtio_pci_vq(&net->vp, VNET_TX_QUEUE);
    bool used = false;
    flush_out(net);
    while (virtio_pci_queue_live(&net->vp, VNET_TX_QUEUE)) {
        if (pop(net, VNET_TX_QUEUE) <= 0)
            break;
        enum tx_result r = take_tx_chain(net);
        if (r == TX_NO_ROOM && flush_out(net))
            r = take_tx_chain(net); /* the socket took everything: any frame fits now */
        if (r == TX_NO_ROOM) {
            virtq_unpop(vq); /* backpressure: the guest's buffers wait in the ring until the socket drains */
            break;
        }
        virtq_push(vq, net->chain.head, 0);
        used = true;
    }
    flush_out(net);
    if (used)
        virtio_pci_queue_used(&net->vp, VNET_TX_QUEUE);
}

/* ---- receive ------------------------------------------------------------ */

/* Copies len bytes into the chain's writable part from offset skip on (the caller checked they fit). */
static void chain_write(const struct virtq_chain *c, uint64_t skip, const uint8_t *src, size_t len)
{
    size_t done = 0;
    for (unsigned i = c->n_out; i < c->n_out + c->n_in && done < len; i++) {
        size_t seg = c->seg[i].iov_len;
        if (skip >= seg) {
            skip -= seg;
            continue;
        }
        size_t n = seg - skip < len - done ? seg - skip : len - done;
        memcpy((uint8_t *)c->seg[i].iov_base + skip, src + done, n);
        done += n;
        skip = 0;
    }
}

/* Fills the chain's writable part: the header, then the frame. */
static void deliver(const struct virtq_chain *c, const uint8_t *frame, size_t len)
{
    uint8_t hdr[VNET_HDR_BYTES] = {0};
    pci_put_le(hdr + NUM_BUFFERS_OFFSET, 2, 1);
    chain_write(c, 0, hdr, sizeof hdr);
    chain_write(c, VNET_HDR_BYTES, frame, len);
}

enum rx_result { RX_MOVED, RX_NEED_BYTES, RX_NEED_BUFFER, RX_BROKEN };

/* Hands the first buffered frame to the guest (or drops it); what stopped it if nothing moved. */
static enum rx_result deliver_one(struct virtio_net *net, bool *used)
{
    if (net->in_len < VNET_PREFIX_BYTES)
        return RX_NEED_BYTES;
    const uint8_t *at = net->in + net->in_start;
    uint32_t len = get_be32(at);
    if (len > VNET_MAX_FRAME) {
        hang_up(net, "the network socket sent a frame longer than 65535 bytes");
        return RX_BROKEN;
    }
    if (net->in_len < VNET_PREFIX_BYTES + len)
        return RX_NEED_BYTES;
    if (len >= VNET_MIN_FRAME) {
        if (pop(net, VNET_RX_QUEUE) <= 0)
            return RX_NEED_BUFFER;
        if (net->chain.in_bytes >= VNET_HDR_BYTES + len) {
            deliver(&net->chain, at + VNET_PREFIX_BYTES, len);
            virtq_push(virtio_pci_vq(&net->vp, VNET_RX_QUEUE), net->chain.head, VNET_HDR_BYTES + len);
            net->rx_frames++;
            *used = true;
        } else {
            virtq_unpop(virtio_pci_vq(&net->vp, VNET_RX_QUEUE)); /* too small for this frame: kept for the next */
            net->rx_dropped++;
        }
    } else {
        net->rx_dropped++; /* shorter than an Ethernet header */
    }
    net->in_start += VNET_PREFIX_BYTES + len;
    net->in_len -= VNET_PREFIX_BYTES + len;
    if (net->in_len == 0)
        net->in_start = 0;
    return RX_MOVED;
}

static bool guest_can_receive(const struct virtio_net *net)
{
    return virtio_pci_queue_live(&net->vp, VNET_RX_QUEUE) &&
           virtq_has_avail(&net->vp.queue[VNET_RX_QUEUE].vq);
}

/* Reads what fits after the buffered bytes; false when nothing more comes now. */
static bool fill_in(struct virtio_net *net)
{
    if (net->in_start > 0) {
        memmove(net->in, net->in + net->in_start, net->in_len);
        net->in_start = 0;
    }
    size_t room = VNET_RX_BUF_SIZE - net->in_len;
    if (room == 0)
        return false; /* cannot happen: a whole frame fits, and whole frames are delivered first */
    ssize_t n;
    do
        n = read(net->fd, net->in + net->in_len, room);
    while (n < 0 && errno == EINTR);
    if (n > 0) {
        net->in_len += (size_t)n;
        return true;
    }
    if (n == 0)
        hang_up(net, "the network socket closed");
    else if (errno != EAGAIN && errno != EWOULDBLOCK)
        hang_up(net, "the network socket failed on read");
    return false;
}

/* Reads per call: a guest whose buffers take nothing (all too small) must not keep a thread reading a flood for ever;
   what is left in the socket polls readable again. */
#define RX_READS_PER_CALL 16

static void pump_rx(struct virtio_net *net)
{
    bool used = false;
    unsigned reads = 0;
    while (net->fd >= 0 && virtio_pci_queue_live(&net->vp, VNET_RX_QUEUE)) {
        enum rx_result r = deliver_one(net, &used);
        if (r == RX_MOVED)
            continue;
        /* Backpressure: read only while the guest has somewhere to put a frame. */
        if (r != RX_NEED_BYTES || reads++ == RX_READS_PER_CALL || !guest_can_receive(net) || !fill_in(net))
            break;
    }
    if (used)
        virtio_pci_queue_used(&net->vp, VNET_RX_QUEUE);
}

/* ---- transport hooks -------------------------------------------------- */

static void queue_notify(struct virtio_pci *vp, unsigned q)
{
    if (q == VNET_TX_QUEUE)
        pump_tx(to_net(vp));
    else if (q == VNET_RX_QUEUE)
        pump_rx(to_net(vp));
}

static void config_access(struct virtio_pci *vp, uint64_t off, bool is_write, uint8_t *data, unsigned len)
{
    if (is_write)
        return; /* the MAC is not writable without VIRTIO_NET_F_CTRL_MAC_ADDR */
    uint8_t cfg[CONFIG_SIZE];
    memcpy(cfg, to_net(vp)->mac, 6);
    pci_put_le(cfg + 6, 2, VIRTIO_NET_S_LINK_UP);
    pci_put_le(cfg + 8, 2, 1);
    for (unsigned i = 0; i < len; i++)
        data[i] = off + i < CONFIG_SIZE ? cfg[off + i] : 0;
}

static void device_reset(struct virtio_pci *vp)
{
    /* Nothing to forget: buffered bytes are the stream's (dropping a partial frame would break its framing),
       and their frames go to whatever rings the driver sets up next. */
    (void)vp;
}

static void driver_ok(struct virtio_pci *vp)
{
    pump_tx(to_net(vp)); /* buffers posted before DRIVER_OK */
    pump_rx(to_net(vp));
}

static const struct virtio_device_ops net_ops = {
    .reset = device_reset,
    .queue_notify = queue_notify,
    .config_access = config_access,
    .driver_ok = driver_ok,
};

/* ---- public API ------------------------------------------------------- */

bool virtio_net_init(struct virtio_net *net, const uint8_t mac[6], const struct guest_mem *mem, virtio_msi_fn msi,
                     void *msi_ctx)
{
    memset(net, 0, sizeof *net);
    memcpy(net->mac, mac, 6);
    net->fd = net->hungup_fd = -1;
    reset_stream(net);
    struct virtio_pci_params params = {
        .virtio_id = VIRTIO_ID_NET,
        .class_code = PCI_CLASS_NETWORK_ETHERNET,
        .device_features = 1ull << VIRTIO_NET_F_MAC | 1ull << VIRTIO_NET_F_STATUS,
        .num_queues = 2,
        .queue_max_size = VNET_QUEUE_SIZE,
    };
    return virtio_pci_init(&net->vp, &params, &net_ops, net, mem, msi, msi_ctx);
}

void virtio_net_set_fd(struct virtio_net *net, int fd)
{
    if (fd >= 0) {
        int fl = fcntl(fd, F_GETFL);
        if (fl >= 0 && !(fl & O_NONBLOCK))
            fcntl(fd, F_SETFL, fl | O_NONBLOCK); /* the vCPU thread must never block on it */
    }
    net->fd = fd;
    reset_stream(net);
    virtio_net_io(net);
}

void virtio_net_io(struct virtio_net *net)
{
    pump_tx(net);
    pump_rx(net);
}

short virtio_net_poll_events(const struct virtio_net *net)
{
    if (net->fd < 0)
        return 0;
    short ev = 0;
    if (guest_can_receive(net))
        ev |= POLLIN;
    if (net->out_len > 0)
        ev |= POLLOUT;
    return ev;
}

int virtio_net_take_hungup_fd(struct virtio_net *net)
{
    int fd = net->hungup_fd;
    net->hungup_fd = -1;
    return fd;
}

/* ---- saved state -------------------------------------------------------- */

_Static_assert(sizeof(struct virtio_net_state) == sizeof(struct virtio_pci_state) + 8, "no implicit padding in saved state");

void virtio_net_save(const struct virtio_net *net, struct virtio_net_state *s)
{
    memset(s, 0, sizeof *s);
    virtio_pci_save(&net->vp, &s->vp); /* no chain is ever held between calls: nothing to give back */
    memcpy(s->mac, net->mac, sizeof s->mac);
}

bool virtio_net_restore(struct virtio_net *net, const struct virtio_net_state *s)
{
    if (memcmp(s->mac, net->mac, sizeof s->mac) != 0 || s->reserved[0] || s->reserved[1])
        return false;
    if (!virtio_pci_restore(&net->vp, &s->vp))
        return false;
    net->fd = -1;
    net->hungup_fd = -1;
    reset_stream(net);
    return true;
}
