/*
 * Fuzz target: the NIC, from a running driver, with a hostile network
 * process on the other end of its socket. The input is a program: post
 * transmit frames and receive buffers of any length and shape, scribble on
 * both queues' rings and descriptors, kick any queue, poke the BAR and
 * config space, reset and restart; and on the host side write any bytes
 * (length prefixes included, 65535 and above), read some or none (a full
 * socket), hang up, or connect a new socket mid-frame. After every step the
 * device's buffers must be within their bounds, and after the program every
 * descriptor is closed.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "../test/driver.h"

#define FEATURES (VIRTIO_FEATURE_VERSION_1 | 1ull << 5 /* MAC */ | 1ull << 16 /* STATUS */)
#define NQ 2

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
static struct drv D;
static int sv[2] = {-1, -1};

static void hang_up_host(void)
{
    /* The device only ever lets go of the current sv[0] (every new pair comes through here first): closed below. */
    (void)virtio_net_take_hungup_fd(&D.net);
    for (int i = 0; i < 2; i++)
        if (sv[i] >= 0)
            close(sv[i]), sv[i] = -1;
}

static void connect_host(void)
{
    hang_up_host();
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0, sv) < 0)
        abort();
    int small = 4096;
    setsockopt(sv[0], SOL_SOCKET, SO_SNDBUF, &small, sizeof small); /* reach a full socket quickly */
    virtio_net_set_fd(&D.net, sv[0]);
}

static void op_chain(struct drv *d, struct input *in)
{
    unsigned q = (unsigned)take(in, 1) % NQ;
    unsigned n = 1 + (unsigned)take(in, 1) % 4, out = (unsigned)take(in, 1) % (n + 1);
    uint64_t addr[4];
    uint32_t len[4];
    for (unsigned i = 0; i < n; i++) {
        uint32_t l = (uint32_t)take(in, 1);
        len[i] = l & 0x80 ? (uint32_t)take(in, 3) % 70000 : l;
        addr[i] = drv_alloc(d, len[i]);
        memset(ram + addr[i], (int)take(in, 1), len[i] < 64 ? len[i] : 64);
    }
    if (d->q[q].size)
        drv_add(d, q, addr, len, n, q == VNET_TX_QUEUE ? out : 0);
}

static void op_desc(struct drv *d, struct input *in)
{
    unsigned q = (unsigned)take(in, 1) % NQ;
    if (!d->q[q].size)
        return;
    uint16_t i = (uint16_t)(take(in, 1) % d->q[q].size);
    uint8_t *desc = ram + d->q[q].desc + 16 * i;
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
    struct drv_queue *q = &d->q[(unsigned)take(in, 1) % NQ];
    if (!q->size)
        return;
    uint16_t head = (uint16_t)take(in, 1);
    memcpy(ram + q->avail + 4 + 2 * (q->avail_idx % q->size), &head, 2);
    q->avail_idx = (uint16_t)(q->avail_idx + (take(in, 1) & 1 ? 1 : (uint16_t)take(in, 2)));
    memcpy(ram + q->avail + 2, &q->avail_idx, 2);
}

static void op_mmio(struct drv *d, struct input *in, bool wr)
{
    uint64_t bar = pci_bar_address(&d->net.vp.pci, VIRTIO_PCI_BAR);
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

/* The network process writes: a well-formed frame, or raw bytes from the input (any prefix). */
static void op_host_write(struct input *in)
{
    static uint8_t buf[4 + 2048];
    size_t n;
    if (take(in, 1) & 1) {
        uint32_t len = (uint32_t)take(in, 2) % 2048;
        buf[0] = 0, buf[1] = 0, buf[2] = (uint8_t)(len >> 8), buf[3] = (uint8_t)len;
        memset(buf + 4, 0x5A, len);
        n = 4 + len;
    } else {
        n = (size_t)take(in, 1) % 16;
        for (size_t i = 0; i < n; i++)
            buf[i] = (uint8_t)take(in, 1);
    }
    if (sv[1] >= 0 && send(sv[1], buf, n, MSG_DONTWAIT | MSG_NOSIGNAL) < 0) {
        /* full or gone: the network process would wait */
    }
}

static void op_host_read(struct input *in)
{
    static uint8_t buf[1 << 16];
    size_t n = take(in, 1) & 1 ? sizeof buf : (size_t)take(in, 2) % sizeof buf + 1;
    if (sv[1] >= 0 && recv(sv[1], buf, n, MSG_DONTWAIT) < 0) {
        /* nothing there */
    }
}

static void op_host(struct input *in)
{
    switch (take(in, 1) % 6) {
    case 0: op_host_write(in); break;
    case 1: op_host_read(in); break;
    case 2: virtio_net_io(&D.net); break;
    case 3: if (sv[1] >= 0) shutdown(sv[1], SHUT_WR); break;
    case 4: connect_host(); break; /* a new stream, mid-frame perhaps */
    default: virtio_net_set_fd(&D.net, -1); break;
    }
}

static void run_op(struct drv *d, struct input *in)
{
    uint32_t id, len;
    switch (take(in, 1) % 10) {
    case 0: op_chain(d, in); break;
    case 1: op_desc(d, in); break;
    case 2: op_publish(d, in); break;
    case 3: drv_kick(d, (unsigned)take(in, 1) % 3); break;
    case 4: op_mmio(d, in, true); break;
    case 5: op_mmio(d, in, false); break;
    case 6: op_config(d, in, take(in, 1) & 1); break;
    case 7: for (unsigned q = 0; q < NQ; q++) while (d->q[q].size && drv_used(d, q, &id, &len)) {} break;
    case 8: op_host(in); break;
    default: if (take(in, 1) & 1) drv_start(d, take(in, 1) & 1 ? FEATURES : take(in, 8)); else virtio_pci_resignal(&d->net.vp); break;
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (!ram)
        ram = aligned_alloc(4096, DRV_RAM_SIZE);
    memset(ram, 0, DRV_RAM_SIZE);
    if (!drv_create_net(&D, ram) || !drv_probe_device(&D, 0x1041) || !drv_start(&D, FEATURES))
        abort();
    connect_host();
    struct input in = {data, size};
    for (unsigned steps = 0; in.left && steps < 512; steps++) {
        run_op(&D, &in);
        if (D.net.out_start + D.net.out_len > VNET_TX_BUF_SIZE || D.net.in_start + D.net.in_len > VNET_RX_BUF_SIZE)
            abort(); /* the device's memory is bounded, whatever the guest or the network process does */
    }
    hang_up_host();
    return 0;
}
