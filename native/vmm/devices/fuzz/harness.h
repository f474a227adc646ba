/*
 * Shared fuzz harness: the input is a program of guest and host operations
 * run against a freshly set-up bus with a virtio console and a UART. Guest
 * RAM (1 MiB) starts zeroed; operations can scribble on the virtqueue rings,
 * post well-formed chains, kick queues, poke config space, I/O ports and BAR
 * registers, and move data on the host end of the agent port.
 *
 * Include this from exactly one fuzz_*.c, which defines FUZZ_SETUP_LEVEL:
 *   0  nothing set up: the driver must find and program everything itself
 *   2  driver running and the multiport handshake done, host connected
 */
#ifndef CLADE_FUZZ_HARNESS_H
#define CLADE_FUZZ_HARNESS_H

#include <fcntl.h>
#include <linux/virtio_console.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "../test/driver.h"
#include "../uart8250.h"

#define RING_AREA 0x10000
#define RING_AREA_SIZE (0x2000 * 6)

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

static uint8_t *fuzz_ram;
static struct drv fuzz_drv;
static struct uart8250 fuzz_uart;
static int fuzz_sv[2] = {-1, -1};

static void fuzz_once(void)
{
    if (fuzz_ram)
        return;
    signal(SIGPIPE, SIG_IGN);
    fuzz_ram = aligned_alloc(4096, DRV_RAM_SIZE);
    socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK, 0, fuzz_sv);
    int small = 8192;
    setsockopt(fuzz_sv[0], SOL_SOCKET, SO_SNDBUF, &small, sizeof small);
}

static void drain(int fd)
{
    static uint8_t sink[65536];
    while (read(fd, sink, sizeof sink) > 0)
        ;
}

static unsigned width(uint64_t sel) { return 1u << (sel & 3); } /* 1, 2, 4, 8 */

static void op_ring_bytes(struct drv *d, struct input *in)
{
    uint64_t off = take(in, 2) % RING_AREA_SIZE;
    unsigned len = (unsigned)take(in, 1) % 32;
    for (unsigned i = 0; i < len && in->left; i++)
        d->ram[RING_AREA + (off + i) % RING_AREA_SIZE] = (uint8_t)take(in, 1);
}

static void op_add_chain(struct drv *d, struct input *in)
{
    unsigned q = (unsigned)take(in, 1) % 6, n = 1 + (unsigned)take(in, 1) % 4, out = (unsigned)take(in, 1) % (n + 1);
    uint64_t addr[4];
    uint32_t len[4];
    for (unsigned i = 0; i < n; i++) {
        len[i] = (uint32_t)take(in, 2) % 4097;
        addr[i] = drv_alloc(d, len[i]);
    }
    if (d->q[q].size)
        drv_add(d, q, addr, len, n, out);
}

static void op_control(struct drv *d, struct input *in)
{
    uint32_t id = (uint32_t)take(in, 1);
    uint16_t event = (uint16_t)(take(in, 1) % 9), value = (uint16_t)(take(in, 1) % 3);
    if (d->q[3].size)
        drv_send_control(d, id == 255 ? 0xFFFFFFFFu : id % 4, event, value);
}

static void op_host_write(struct input *in)
{
    uint8_t buf[64];
    unsigned len = (unsigned)take(in, 1) % sizeof buf;
    for (unsigned i = 0; i < len; i++)
        buf[i] = (uint8_t)take(in, 1);
    if (write(fuzz_sv[1], buf, len) < 0) {
        /* full: fine */
    }
}

static void op_port_io(struct drv *d, struct input *in)
{
    uint8_t data[8];
    uint64_t v = take(in, 8);
    memcpy(data, &v, 8);
    uint16_t port = (uint16_t)take(in, 2);
    unsigned w = width(take(in, 1)) & 7;
    bool wr = take(in, 1) & 1;
    /* Mostly the ports that matter, sometimes anything. */
    if (!(port & 0x8000))
        port = (uint16_t)((port & 1 ? 0xCF8 : 0x3F8) + (port >> 1) % 8);
    if (!w)
        w = 4;
    if (!pci_io(&d->bus, port, wr, data, w))
        uart_io(&fuzz_uart, port, wr, data, w);
}

static void op_mmio(struct drv *d, struct input *in, bool wr)
{
    uint64_t bar = pci_bar_address(&d->con.vp.pci, VIRTIO_PCI_BAR);
    uint64_t off = take(in, 2) % (VIRTIO_PCI_BAR_SIZE + 16);
    unsigned w = width(take(in, 1));
    uint64_t v = take(in, 8);
    uint8_t data[8];
    memcpy(data, &v, 8);
    pci_mmio(&d->bus, bar + off, wr, data, w);
}

static void op_config(struct drv *d, struct input *in, bool wr)
{
    unsigned off = (unsigned)take(in, 1);
    unsigned w = width(take(in, 1)) & 7;
    uint32_t v = (uint32_t)take(in, 4);
    if (!w)
        w = 4;
    off &= ~(w - 1);
    /* Keep the BAR in place most of the time so MMIO stays reachable. */
    if (wr && off >= PCI_BAR0 && off < PCI_BAR0 + 8 && (v & 1))
        return;
    if (wr)
        drv_cfg_write(d, d->slot ? d->slot : 1, off, w, v);
    else
        drv_cfg_read(d, d->slot ? d->slot : 1, off, w);
}

static void run_op(struct drv *d, struct input *in)
{
    switch (take(in, 1) % 16) {
    case 0: op_ring_bytes(d, in); break;
    case 1: op_add_chain(d, in); break;
    case 2: drv_kick(d, (unsigned)take(in, 1) % 7); break;
    case 3: op_host_write(in); break;
    case 4: virtio_console_port_io(&d->con, (unsigned)take(in, 1) % 3); break;
    case 5: virtio_console_port_set_fd(&d->con, 1, d->con.port[1].fd >= 0 ? -1 : fuzz_sv[0]); break;
    case 6: op_mmio(d, in, true); break;
    case 7: op_mmio(d, in, false); break;
    case 8: op_config(d, in, true); break;
    case 9: op_config(d, in, false); break;
    case 10: op_control(d, in); break;
    case 11: drain(fuzz_sv[1]); break;
    case 12: virtio_pci_resignal(&d->con.vp); uart_resync_irq(&fuzz_uart); break;
    case 13: op_port_io(d, in); break;
    case 14: if (take(in, 1) & 1) drv_start(d, take(in, 8)); else drv_mw(d, d->common + 0x14, 1, take(in, 1)); break;
    default: virtio_console_port_discard_output(&d->con, (unsigned)take(in, 1) % 3); break;
    }
}

static void post_control_buffers(struct drv *d)
{
    for (unsigned i = 0; i < 8; i++) {
        uint64_t a = drv_alloc(d, 128);
        uint32_t l = 128;
        drv_add(d, 2, &a, &l, 1, 0);
    }
    drv_kick(d, 2);
}

static void fuzz_setup(struct drv *d)
{
    memset(fuzz_ram, 0, DRV_RAM_SIZE);
    drain(fuzz_sv[0]);
    drain(fuzz_sv[1]);
    drv_create(d, fuzz_ram);
    uart_init(&fuzz_uart, UART_COM1_BASE, -1, NULL, NULL);
    if (FUZZ_SETUP_LEVEL == 0) {
        d->common = pci_bar_address(&d->con.vp.pci, VIRTIO_PCI_BAR);
        d->notify = d->common + VIRTIO_PCI_NOTIFY_OFFSET;
        d->notify_mult = 4;
        return;
    }
    drv_probe(d);
    drv_start(d, VIRTIO_FEATURE_VERSION_1 | 1ull << VIRTIO_CONSOLE_F_MULTIPORT);
    post_control_buffers(d);
    drv_send_control(d, 0xFFFFFFFFu, VIRTIO_CONSOLE_DEVICE_READY, 1);
    drv_send_control(d, 0, VIRTIO_CONSOLE_PORT_READY, 1);
    drv_send_control(d, 1, VIRTIO_CONSOLE_PORT_READY, 1);
    drv_send_control(d, 1, VIRTIO_CONSOLE_PORT_OPEN, 1);
    virtio_console_port_set_fd(&d->con, 1, fuzz_sv[0]);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    fuzz_once();
    struct drv *d = &fuzz_drv;
    fuzz_setup(d);
    struct input in = {data, size};
    for (unsigned ops = 0; in.left && ops < 4096; ops++)
        run_op(d, &in);
    return 0;
}

#endif
