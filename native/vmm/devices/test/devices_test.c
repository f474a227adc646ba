/*
 * Host-side test of the device library: plays the guest's drivers against
 * fake guest RAM, the 8250 probe, and a catalogue of hostile inputs. Prints
 * "PASS: N checks, 0 failed" when everything holds.
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/virtio_blk.h>
#include <linux/virtio_console.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <unistd.h>

#include "../uart8250.h"
#include "driver.h"

static unsigned checks, failed;

#define CHECK(cond)                                                                                                    \
    do {                                                                                                               \
        checks++;                                                                                                      \
        if (!(cond)) {                                                                                                 \
            failed++;                                                                                                  \
            fprintf(stderr, "FAIL %s:%d: %s\n", __FILE__, __LINE__, #cond);                                            \
        }                                                                                                              \
    } while (0)

#define AGENT 1     /* port id of org.clade.agent */
#define CIVQ 2      /* control, device -> driver */
#define COVQ 3      /* control, driver -> device */
#define AGENT_RX 4
#define AGENT_TX 5
#define FEATURES (VIRTIO_FEATURE_VERSION_1 | 1ull << VIRTIO_CONSOLE_F_MULTIPORT)

static uint8_t *ram;
static struct drv D;

/* ---- helpers ---------------------------------------------------------- */

static void post_control_buffers(struct drv *d, unsigned n)
{
    for (unsigned i = 0; i < n; i++) {
        uint64_t a = drv_alloc(d, 128);
        uint32_t l = 128;
        drv_add(d, CIVQ, &a, &l, 1, 0);
    }
    drv_kick(d, CIVQ);
}

struct ctrl {
    uint32_t id;
    uint16_t event, value;
    char name[64];
};

static bool next_control(struct drv *d, struct ctrl *m)
{
    uint32_t head, len;
    if (!drv_used(d, CIVQ, &head, &len))
        return false;
    uint64_t addr;
    memcpy(&addr, d->ram + d->q[CIVQ].desc + 16 * head, 8);
    memset(m, 0, sizeof *m);
    memcpy(&m->id, ram + addr, 4);
    memcpy(&m->event, ram + addr + 4, 2);
    memcpy(&m->value, ram + addr + 6, 2);
    if (len > 8 && len - 8 < sizeof m->name)
        memcpy(m->name, ram + addr + 8, len - 8);
    return true;
}

static bool expect_control(struct drv *d, uint32_t id, uint16_t event, uint16_t value)
{
    struct ctrl m;
    if (!next_control(d, &m)) {
        fprintf(stderr, "  no control message (wanted id %u event %u)\n", id, event);
        return false;
    }
    if (m.id != id || m.event != event || m.value != value)
        fprintf(stderr, "  control: got %u/%u/%u wanted %u/%u/%u\n", m.id, m.event, m.value, id, event, value);
    return m.id == id && m.event == event && m.value == value;
}

static void post_rx(struct drv *d, unsigned q, uint32_t len)
{
    uint64_t a = drv_alloc(d, len);
    drv_add(d, q, &a, &len, 1, 0);
    drv_kick(d, q);
}

static void send_tx(struct drv *d, unsigned q, const void *data, uint32_t len)
{
    uint64_t a = drv_alloc(d, len);
    memcpy(ram + a, data, len);
    drv_add(d, q, &a, &len, 1, 1);
    drv_kick(d, q);
}

static bool got_msi(struct drv *d, unsigned vector, unsigned since)
{
    for (unsigned i = since; i < d->msi_count && i < DRV_MAX_MSI; i++)
        if (d->msi_data[i] == 0x30 + vector)
            return true;
    return false;
}

/* Brings the device up to "agent port open on both ends"; returns host fd. */
static int bring_up(struct drv *d, int sv[2])
{
    CHECK(drv_create(d, ram));
    CHECK(drv_probe(d));
    CHECK(drv_start(d, FEATURES));
    post_control_buffers(d, 16);
    drv_send_control(d, (uint32_t)-1, VIRTIO_CONSOLE_DEVICE_READY, 1);
    uint32_t id, len;
    CHECK(drv_used(d, COVQ, &id, &len)); /* returned at once: Linux spins on it */
    CHECK(expect_control(d, 0, VIRTIO_CONSOLE_PORT_ADD, 1));
    CHECK(expect_control(d, 1, VIRTIO_CONSOLE_PORT_ADD, 1));
    drv_send_control(d, 0, VIRTIO_CONSOLE_PORT_READY, 1);
    CHECK(expect_control(d, 0, VIRTIO_CONSOLE_CONSOLE_PORT, 1));
    drv_send_control(d, AGENT, VIRTIO_CONSOLE_PORT_READY, 1);
    struct ctrl m;
    CHECK(next_control(d, &m) && m.id == AGENT && m.event == VIRTIO_CONSOLE_PORT_NAME &&
          strcmp(m.name, "org.clade.agent") == 0);
    CHECK(!next_control(d, &m)); /* host not connected yet: no PORT_OPEN */
    CHECK(socketpair(AF_UNIX, SOCK_STREAM, 0, sv) == 0);
    virtio_console_port_set_fd(&d->con, AGENT, sv[0]);
    CHECK(expect_control(d, AGENT, VIRTIO_CONSOLE_PORT_OPEN, 1));
    drv_send_control(d, AGENT, VIRTIO_CONSOLE_PORT_OPEN, 1);
    return sv[1];
}

/* ---- tests ------------------------------------------------------------ */

static void test_enumeration(void)
{
    struct drv *d = &D;
    CHECK(drv_create(d, ram));
    CHECK(drv_cfg_read(d, 0, PCI_CLASS_PROG + 1, 2) == 0x0600); /* host bridge */
    CHECK(drv_cfg_read(d, 5, 0, 4) == 0xFFFFFFFFu);                /* empty slot */
    uint8_t b[4];
    pci_put_le(b, 4, 0x80010000u); /* bus 1 */
    pci_io(&d->bus, 0xCF8, true, b, 4);
    pci_io(&d->bus, 0xCFC, false, b, 4);
    CHECK(pci_get_le(b, 4) == 0xFFFFFFFFu);
    pci_put_le(b, 4, 0x80000000u); /* Linux's mechanism #1 probe reads this back */
    pci_io(&d->bus, 0xCF8, true, b, 4);
    memset(b, 0, 4);
    pci_io(&d->bus, 0xCF8, false, b, 4);
    CHECK(pci_get_le(b, 4) == 0x80000000u);
    CHECK(!pci_io(&d->bus, 0x80, false, b, 1));
    CHECK(drv_probe(d));
    CHECK(drv_cfg_read(d, d->slot, PCI_REVISION, 1) == 1);
    CHECK(drv_cfg_read(d, d->slot, PCI_INTERRUPT_PIN, 1) == 0);
    /* BAR sizing: all ones in, size mask out, and the address restored. */
    unsigned bar = PCI_BAR0 + 4 * VIRTIO_PCI_BAR;
    uint32_t lo = drv_cfg_read(d, d->slot, bar, 4), hi = drv_cfg_read(d, d->slot, bar + 4, 4);
    CHECK((lo & 7) == 4); /* 64-bit memory BAR */
    drv_cfg_write(d, d->slot, PCI_COMMAND, 2, 0);
    drv_cfg_write(d, d->slot, bar, 4, 0xFFFFFFFFu);
    drv_cfg_write(d, d->slot, bar + 4, 4, 0xFFFFFFFFu);
    CHECK(drv_cfg_read(d, d->slot, bar, 4) == ((uint32_t)~(VIRTIO_PCI_BAR_SIZE - 1) | 4));
    CHECK(drv_mr(d, d->common, 4) == ~0ull); /* decoding is off: nobody claims it */
    /* Move the BAR and check the registers follow it. */
    drv_cfg_write(d, d->slot, bar, 4, 0xD0000000u);
    drv_cfg_write(d, d->slot, bar + 4, 4, 0);
    drv_cfg_write(d, d->slot, PCI_COMMAND, 2, PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER);
    CHECK(drv_mr(d, 0xD0000000u + 0x12, 2) == 6); /* num_queues */
    drv_cfg_write(d, d->slot, bar, 4, lo);
    drv_cfg_write(d, d->slot, bar + 4, 4, hi);
    CHECK(drv_mr(d, d->common + 0x12, 2) == 6);
    /* Read-only header fields stay. */
    drv_cfg_write(d, d->slot, 0, 4, 0x12345678);
    CHECK(drv_cfg_read(d, d->slot, 0, 4) == (0x1043u << 16 | 0x1af4));
    /* Misaligned config access: rejected as all ones. */
    uint8_t w[4];
    pci_put_le(w, 4, 0x80000000u | d->slot << 11);
    pci_io(&d->bus, 0xCF8, true, w, 4);
    pci_io(&d->bus, 0xCFD, false, w, 4);
    CHECK(pci_get_le(w, 4) == 0xFFFFFFFFu);
    pci_io(&d->bus, 0xCFE, false, w, 2);
    CHECK(pci_get_le(w, 2) == 0x1043);
    /* Device config: max_nr_ports, through MMIO and the PCI-config window. */
    CHECK(drv_mr(d, d->devcfg + 4, 4) == 2);
    CHECK(d->cfg_cap != 0);
    drv_cfg_write(d, d->slot, d->cfg_cap + 4, 1, VIRTIO_PCI_BAR);
    drv_cfg_write(d, d->slot, d->cfg_cap + 8, 4, VIRTIO_PCI_DEVICE_OFFSET + 4);
    drv_cfg_write(d, d->slot, d->cfg_cap + 12, 4, 4);
    CHECK(drv_cfg_read(d, d->slot, d->cfg_cap + 16, 4) == 2);
}

static void test_handshake_and_data(void)
{
    struct drv *d = &D;
    int sv[2];
    int host = bring_up(d, sv);
    /* guest -> host */
    unsigned before = d->msi_count;
    send_tx(d, AGENT_TX, "hello", 5);
    char buf[64] = {0};
    CHECK(read(host, buf, sizeof buf) == 5 && memcmp(buf, "hello", 5) == 0);
    uint32_t id, len;
    CHECK(drv_used(d, AGENT_TX, &id, &len));
    CHECK(got_msi(d, AGENT_TX + 1, before));
    /* host -> guest: two readable and split across a two-segment buffer */
    before = d->msi_count;
    uint64_t a[2] = {drv_alloc(d, 3), drv_alloc(d, 16)};
    uint32_t l[2] = {3, 16};
    drv_add(d, AGENT_RX, a, l, 2, 0);
    drv_kick(d, AGENT_RX);
    CHECK(virtio_console_port_poll_events(&d->con, AGENT) == POLLIN);
    CHECK(write(host, "world!", 6) == 6);
    virtio_console_port_io(&d->con, AGENT);
    CHECK(drv_used(d, AGENT_RX, &id, &len) && len == 6);
    CHECK(memcmp(ram + a[0], "wor", 3) == 0 && memcmp(ram + a[1], "ld!", 3) == 0);
    CHECK(got_msi(d, AGENT_RX + 1, before));
    /* Console port 0: output goes nowhere (no fd) but is consumed. */
    send_tx(d, 1, "boot", 4);
    CHECK(drv_used(d, 1, &id, &len));
    /* Masked vector: pending bit, then delivered on unmask. */
    drv_mw(d, d->msix_table + 16 * (AGENT_TX + 1) + 12, 4, 1);
    before = d->msi_count;
    send_tx(d, AGENT_TX, "x", 1);
    CHECK(!got_msi(d, AGENT_TX + 1, before));
    CHECK(drv_mr(d, d->pba, 4) & (1u << (AGENT_TX + 1)));
    drv_mw(d, d->msix_table + 16 * (AGENT_TX + 1) + 12, 4, 0);
    CHECK(got_msi(d, AGENT_TX + 1, before));
    CHECK((drv_mr(d, d->pba, 4) & (1u << (AGENT_TX + 1))) == 0);
    CHECK(read(host, buf, sizeof buf) == 1);
    /* Function mask holds everything back too. */
    drv_cfg_write(d, d->slot, d->msix_cap + 2, 2, 0xC000);
    before = d->msi_count;
    send_tx(d, AGENT_TX, "y", 1);
    CHECK(d->msi_count == before);
    drv_cfg_write(d, d->slot, d->msix_cap + 2, 2, 0x8000);
    CHECK(d->msi_count == before + 1);
    CHECK(read(host, buf, sizeof buf) == 1);
    /* Interrupt suppression by the driver. */
    *(uint16_t *)(ram + d->q[AGENT_TX].avail) = VIRTQ_AVAIL_F_NO_INTERRUPT;
    before = d->msi_count;
    send_tx(d, AGENT_TX, "z", 1);
    CHECK(d->msi_count == before);
    *(uint16_t *)(ram + d->q[AGENT_TX].avail) = 0;
    CHECK(read(host, buf, sizeof buf) == 1);
    /* Host hangs up: the guest hears PORT_OPEN 0 and the fd is handed back. */
    close(host);
    post_rx(d, AGENT_RX, 64);
    virtio_console_port_io(&d->con, AGENT);
    CHECK(expect_control(d, AGENT, VIRTIO_CONSOLE_PORT_OPEN, 0));
    CHECK(virtio_console_port_take_hungup_fd(&d->con, AGENT) == sv[0]);
    CHECK(virtio_console_port_take_hungup_fd(&d->con, AGENT) == -1);
    close(sv[0]);
    /* Guest writes while disconnected are consumed and dropped. */
    send_tx(d, AGENT_TX, "lost", 4);
    while (drv_used(d, AGENT_TX, &id, &len))
        ;
    CHECK(d->q[AGENT_TX].last_used == d->q[AGENT_TX].avail_idx);
    /* Reconnect, as after a fork: PORT_OPEN 1 again, data flows. */
    CHECK(socketpair(AF_UNIX, SOCK_STREAM, 0, sv) == 0);
    virtio_console_port_set_fd(&d->con, AGENT, sv[0]);
    CHECK(expect_control(d, AGENT, VIRTIO_CONSOLE_PORT_OPEN, 1));
    CHECK(write(sv[1], "again", 5) == 5);
    virtio_console_port_io(&d->con, AGENT);
    CHECK(drv_used(d, AGENT_RX, &id, &len) && len == 5);
    /* Disconnect and reconnect before the guest posts control buffers: both
     * transitions are still told, in order. */
    virtio_console_port_set_fd(&d->con, AGENT, -1);
    virtio_console_port_set_fd(&d->con, AGENT, sv[0]);
    CHECK(expect_control(d, AGENT, VIRTIO_CONSOLE_PORT_OPEN, 0));
    CHECK(expect_control(d, AGENT, VIRTIO_CONSOLE_PORT_OPEN, 1));
    /* Fork-style resignal re-sends every enabled queue's vector. */
    before = d->msi_count;
    virtio_pci_resignal(&d->con.vp);
    CHECK(d->msi_count - before == 6);
    close(sv[0]);
    close(sv[1]);
}

static void test_backpressure(void)
{
    struct drv *d = &D;
    int sv[2];
    int host = bring_up(d, sv);
    int small = 4096;
    setsockopt(sv[0], SOL_SOCKET, SO_SNDBUF, &small, sizeof small);
    setsockopt(host, SOL_SOCKET, SO_RCVBUF, &small, sizeof small);
    enum { CHUNK = 4000, CHUNKS = 48 }; /* 192 KB: more than buffer + socket hold */
    static uint8_t pattern[CHUNK * CHUNKS], got[CHUNK * CHUNKS];
    for (size_t i = 0; i < sizeof pattern; i++)
        pattern[i] = (uint8_t)(i * 7 + i / 251);
    for (unsigned c = 0; c < CHUNKS; c++)
        send_tx(d, AGENT_TX, pattern + c * CHUNK, CHUNK);
    uint32_t id, len;
    unsigned used = 0;
    while (drv_used(d, AGENT_TX, &id, &len))
        used++;
    CHECK(used < CHUNKS); /* the device stopped taking buffers */
    CHECK(virtio_console_port_poll_events(&d->con, AGENT) & POLLOUT);
    size_t have = 0;
    for (int rounds = 0; rounds < 10000 && have < sizeof got; rounds++) {
        ssize_t n = read(host, got + have, sizeof got - have);
        if (n > 0)
            have += (size_t)n;
        virtio_console_port_io(&d->con, AGENT);
    }
    while (drv_used(d, AGENT_TX, &id, &len))
        used++;
    CHECK(have == sizeof got && memcmp(got, pattern, sizeof got) == 0);
    CHECK(used == CHUNKS);
    /* Reset in the middle of a stalled transfer, then a clean restart. */
    for (unsigned c = 0; c < CHUNKS; c++)
        send_tx(d, AGENT_TX, pattern + c * CHUNK, CHUNK);
    drv_mw(d, d->common + 0x14, 1, 0);
    CHECK(drv_status(d) == 0);
    CHECK(virtio_console_port_poll_events(&d->con, AGENT) & POLLOUT); /* old bytes still flush */
    virtio_console_port_discard_output(&d->con, AGENT);
    CHECK(drv_start(d, FEATURES));
    close(sv[0]);
    close(host);
}

static void hostile_setup(struct drv *d)
{
    CHECK(drv_create(d, ram));
    CHECK(drv_probe(d));
    CHECK(drv_start(d, FEATURES));
}

static void write_desc(struct drv *d, unsigned q, uint16_t i, uint64_t addr, uint32_t len, uint16_t flags, uint16_t next)
{
    uint8_t *desc = ram + d->q[q].desc + 16 * i;
    memcpy(desc, &addr, 8);
    memcpy(desc + 8, &len, 4);
    memcpy(desc + 12, &flags, 2);
    memcpy(desc + 14, &next, 2);
}

static void publish(struct drv *d, unsigned q, uint16_t head, uint16_t idx_step)
{
    memcpy(ram + d->q[q].avail + 4 + 2 * (d->q[q].avail_idx % d->q[q].size), &head, 2);
    d->q[q].avail_idx = (uint16_t)(d->q[q].avail_idx + idx_step);
    memcpy(ram + d->q[q].avail + 2, &d->q[q].avail_idx, 2);
    drv_kick(d, q);
}

/* Each case must end with DEVICE_NEEDS_RESET, a config interrupt, and no
 * used buffers. */
static void expect_broken(struct drv *d, unsigned q, unsigned msi_before, const char *what)
{
    uint32_t id, len;
    bool ok = (drv_status(d) & VIRTIO_STATUS_NEEDS_RESET) && got_msi(d, 0, msi_before) && !drv_used(d, q, &id, &len);
    if (!ok)
        fprintf(stderr, "  hostile case not rejected: %s\n", what);
    CHECK(ok);
}

static void test_hostile_rings(void)
{
    struct drv *d = &D;
    struct {
        const char *what;
        uint64_t addr;
        uint32_t len;
        uint16_t flags, next, step;
    } cases[] = {
        {"descriptor loop", 0x80000, 16, VIRTQ_DESC_F_NEXT, 0, 1},
        {"address out of RAM", DRV_RAM_SIZE - 8, 16, 0, 0, 1},
        {"address wraps", ~0ull - 4, 16, 0, 0, 1},
        {"huge length", 0x80000, 0xFFFFFFFFu, 0, 0, 1},
        {"indirect not negotiated", 0x80000, 16, VIRTQ_DESC_F_INDIRECT, 0, 1},
        {"next beyond queue", 0x80000, 16, VIRTQ_DESC_F_NEXT, DRV_QSIZE, 1},
        {"avail index jumps", 0x80000, 16, 0, 0, DRV_QSIZE + 1},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        hostile_setup(d);
        unsigned before = d->msi_count;
        write_desc(d, COVQ, 0, cases[i].addr, cases[i].len, cases[i].flags, cases[i].next);
        publish(d, COVQ, 0, cases[i].step);
        expect_broken(d, COVQ, before, cases[i].what);
        /* Further kicks do nothing; a reset brings it back. */
        drv_kick(d, COVQ);
        CHECK(drv_start(d, FEATURES));
        CHECK(!(drv_status(d) & VIRTIO_STATUS_NEEDS_RESET));
    }
    /* Head index out of range. */
    hostile_setup(d);
    unsigned before = d->msi_count;
    publish(d, COVQ, DRV_QSIZE + 3, 1);
    expect_broken(d, COVQ, before, "head out of range");
    /* Writable descriptor followed by a readable one. */
    hostile_setup(d);
    before = d->msi_count;
    write_desc(d, COVQ, 0, 0x80000, 8, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 1);
    write_desc(d, COVQ, 1, 0x80010, 8, 0, 0);
    publish(d, COVQ, 0, 1);
    expect_broken(d, COVQ, before, "readable after writable");
    /* A long but legal chain of every descriptor works. */
    hostile_setup(d);
    for (uint16_t i = 0; i < DRV_QSIZE; i++)
        write_desc(d, COVQ, i, 0x80000 + 8 * i, i == 0 ? 8 : 0, i + 1 < DRV_QSIZE ? VIRTQ_DESC_F_NEXT : 0, i + 1);
    publish(d, COVQ, 0, 1);
    uint32_t id, len;
    CHECK(drv_used(d, COVQ, &id, &len) && id == 0);
    CHECK(!(drv_status(d) & VIRTIO_STATUS_NEEDS_RESET));
    /* Short control message: consumed, ignored. */
    uint64_t a = drv_alloc(d, 4);
    uint32_t l = 4;
    drv_add(d, COVQ, &a, &l, 1, 1);
    drv_kick(d, COVQ);
    CHECK(drv_used(d, COVQ, &id, &len));
    /* Control messages for ports that do not exist. */
    drv_send_control(d, 99, VIRTIO_CONSOLE_PORT_READY, 1);
    drv_send_control(d, 0xFFFFFFFFu, VIRTIO_CONSOLE_PORT_OPEN, 1);
    CHECK(!(drv_status(d) & VIRTIO_STATUS_NEEDS_RESET));
}

static void enable_queue_with(struct drv *d, unsigned q, uint16_t size, uint64_t desc, uint64_t avail, uint64_t used)
{
    drv_mw(d, d->common + 0x14, 1, 0);
    drv_mw(d, d->common + 0x14, 1, 3);
    drv_mw(d, d->common + 0x0C, 4, 0);
    drv_mw(d, d->common + 0x08, 4, 1);
    drv_mw(d, d->common + 0x0C, 4, 1);
    drv_mw(d, d->common + 0x14, 1, 0x0B);
    drv_mw(d, d->common + 0x16, 2, q);
    drv_mw(d, d->common + 0x18, 2, size);
    drv_mw(d, d->common + 0x20, 8, desc);
    drv_mw(d, d->common + 0x28, 8, avail);
    drv_mw(d, d->common + 0x30, 8, used);
    drv_mw(d, d->common + 0x1C, 2, 1);
}

static void test_hostile_registers(void)
{
    struct drv *d = &D;
    hostile_setup(d);
    /* Queue layouts the device must refuse at enable time. */
    struct {
        uint16_t size;
        uint64_t desc, avail, used;
    } bad[] = {
        {48, 0x10000, 0x11000, 0x12000},             /* not a power of two */
        {0, 0x10000, 0x11000, 0x12000},              /* zero */
        {256, 0x10000, 0x11000, 0x12000},            /* above the maximum */
        {64, 0x10008, 0x11000, 0x12000},             /* misaligned descriptors */
        {64, 0x10000, 0x11001, 0x12000},             /* misaligned avail */
        {64, 0x10000, 0x11000, 0x12002},             /* misaligned used */
        {64, DRV_RAM_SIZE - 0x10, 0x11000, 0x12000}, /* runs off RAM */
        {64, 0x10000, 0x11000, ~0ull & ~3ull},       /* wraps */
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        enable_queue_with(d, 2, bad[i].size, bad[i].desc, bad[i].avail, bad[i].used);
        CHECK(drv_mr(d, d->common + 0x1C, 2) == 0);
        CHECK(drv_status(d) & VIRTIO_STATUS_NEEDS_RESET);
    }
    /* Features: without VERSION_1, or beyond what is offered, refused. */
    drv_mw(d, d->common + 0x14, 1, 0);
    CHECK(!drv_start(d, 1ull << VIRTIO_CONSOLE_F_MULTIPORT));
    CHECK(!drv_start(d, FEATURES | 1ull << 28));
    CHECK(drv_start(d, FEATURES));
    /* Read-only fields ignore writes; the driver-feature word is frozen. */
    drv_mw(d, d->common + 0x12, 2, 77);
    CHECK(drv_mr(d, d->common + 0x12, 2) == 6);
    drv_mw(d, d->common + 0x04, 4, 0xFFFFFFFF);
    drv_mw(d, d->common + 0x00, 4, 1);
    CHECK(drv_mr(d, d->common + 0x04, 4) == 1);
    drv_mw(d, d->common + 0x08, 4, 1);
    drv_mw(d, d->common + 0x0C, 4, 0xFF);
    CHECK(drv_mr(d, d->common + 0x0C, 4) == 1);
    drv_mw(d, d->common + 0x15, 1, 9);
    CHECK(drv_mr(d, d->common + 0x15, 1) == 0);
    /* Queue layout is fixed while enabled; disabling is not a thing. */
    drv_mw(d, d->common + 0x16, 2, 3);
    drv_mw(d, d->common + 0x18, 2, 8);
    drv_mw(d, d->common + 0x20, 8, 0x90000);
    drv_mw(d, d->common + 0x1C, 2, 0);
    CHECK(drv_mr(d, d->common + 0x18, 2) == DRV_QSIZE);
    CHECK(drv_mr(d, d->common + 0x20, 8) == d->q[3].desc);
    CHECK(drv_mr(d, d->common + 0x1C, 2) == 1);
    /* Vectors beyond the table read back as NO_VECTOR. */
    drv_mw(d, d->common + 0x1A, 2, 500);
    CHECK(drv_mr(d, d->common + 0x1A, 2) == VIRTIO_MSI_NO_VECTOR);
    /* Absent queue: size 0, writes ignored. */
    drv_mw(d, d->common + 0x16, 2, 40);
    CHECK(drv_mr(d, d->common + 0x18, 2) == 0);
    drv_mw(d, d->common + 0x1C, 2, 1);
    CHECK(drv_mr(d, d->common + 0x1C, 2) == 0);
    /* Odd widths and alignments: reads compose bytes, writes are ignored. */
    CHECK(drv_mr(d, d->common + 0x11, 3) == (uint64_t)6 << 8);
    CHECK(drv_mr(d, d->common + 0x13, 2) == 0x0F << 8);
    drv_mw(d, d->common + 0x13, 2, 0);
    CHECK(drv_status(d) == 0x0F);
    CHECK(drv_mr(d, d->common + 0xFFE, 4) == 0xFFFFFFFFu); /* straddles regions */
    uint64_t bar = d->common - VIRTIO_PCI_COMMON_OFFSET;
    CHECK(drv_mr(d, bar + VIRTIO_PCI_BAR_SIZE - 2, 4) == 0xFFFFFFFFu); /* off the BAR's end */
    CHECK(drv_mr(d, bar + 0x7000, 4) == 0);                            /* unused page */
    CHECK(drv_mr(d, d->msix_table + 2, 4) == 0xFFFFFFFFu);              /* misaligned table */
    CHECK(drv_mr(d, d->msix_table + 16 * 100, 4) == 0xFFFFFFFFu);       /* beyond table */
    drv_mw(d, d->notify + 1, 2, 0);                                    /* misaligned notify */
    drv_mw(d, d->notify + 4 * 40, 2, 0);                               /* absent queue */
    drv_mw(d, d->isr, 1, 0xff);                                        /* ISR is read-only */
    drv_mw(d, d->devcfg + 4, 4, 99);                                   /* config is read-only */
    CHECK(drv_mr(d, d->devcfg + 4, 4) == 2);
    CHECK(drv_mr(d, d->devcfg + 10, 8) == 0);
    CHECK(drv_status(d) == 0x0F);
    /* DRIVER_OK without FEATURES_OK is not accepted. */
    drv_mw(d, d->common + 0x14, 1, 0);
    drv_mw(d, d->common + 0x14, 1, 0x07);
    CHECK(drv_status(d) == 0x03);
    /* No bus mastering: notifications are not acted on. */
    CHECK(drv_start(d, FEATURES));
    drv_cfg_write(d, d->slot, PCI_COMMAND, 2, PCI_COMMAND_MEMORY);
    drv_send_control(d, (uint32_t)-1, VIRTIO_CONSOLE_DEVICE_READY, 1);
    uint32_t id, len;
    CHECK(!drv_used(d, COVQ, &id, &len));
    drv_cfg_write(d, d->slot, PCI_COMMAND, 2, PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER);
    drv_kick(d, COVQ);
    CHECK(drv_used(d, COVQ, &id, &len));
    /* Notification before DRIVER_OK waits for it. */
    drv_mw(d, d->common + 0x14, 1, 0);
    drv_mw(d, d->common + 0x14, 1, 3);
    drv_mw(d, d->common + 0x08, 4, 1);
    drv_mw(d, d->common + 0x0C, 4, 1);
    drv_mw(d, d->common + 0x08, 4, 0);
    drv_mw(d, d->common + 0x0C, 4, 2);
    drv_mw(d, d->common + 0x14, 1, 0x0B);
    memset(d->q, 0, sizeof d->q);
    for (unsigned q = 0; q < 6; q++) {
        d->q[q].size = DRV_QSIZE;
        d->q[q].desc = 0x10000 + 0x2000ull * q;
        d->q[q].avail = d->q[q].desc + 0x800;
        d->q[q].used = d->q[q].desc + 0x1000;
        memset(ram + d->q[q].desc, 0, 0x2000);
        drv_mw(d, d->common + 0x16, 2, q);
        drv_mw(d, d->common + 0x18, 2, DRV_QSIZE);
        drv_mw(d, d->common + 0x20, 8, d->q[q].desc);
        drv_mw(d, d->common + 0x28, 8, d->q[q].avail);
        drv_mw(d, d->common + 0x30, 8, d->q[q].used);
        drv_mw(d, d->common + 0x1C, 2, 1);
    }
    drv_send_control(d, (uint32_t)-1, VIRTIO_CONSOLE_DEVICE_READY, 1);
    CHECK(!drv_used(d, COVQ, &id, &len));
    drv_mw(d, d->common + 0x14, 1, 0x0F);
    CHECK(drv_used(d, COVQ, &id, &len));
}

static unsigned irq_changes;
static bool irq_level;
static void uart_irq(void *ctx, bool level)
{
    (void)ctx;
    irq_level = level;
    irq_changes++;
}

static uint8_t uin(struct uart8250 *u, unsigned reg)
{
    uint8_t v = 0;
    CHECK(uart_io(u, (uint16_t)(0x3f8 + reg), false, &v, 1));
    return v;
}

static void uout(struct uart8250 *u, unsigned reg, uint8_t v) { uart_io(u, (uint16_t)(0x3f8 + reg), true, &v, 1); }

static void test_uart(void)
{
    int p[2];
    CHECK(pipe2(p, O_NONBLOCK) == 0);
    struct uart8250 u;
    uart_init(&u, UART_COM1_BASE, p[1], uart_irq, NULL);
    /* The probe Linux's 8250 driver does: scratch, IER, loopback, FIFO. */
    uout(&u, 7, 0xA5);
    CHECK(uin(&u, 7) == 0xA5);
    uout(&u, 1, 0);
    CHECK(uin(&u, 1) == 0);
    uout(&u, 1, 0x0F);
    CHECK(uin(&u, 1) == 0x0F);
    uout(&u, 1, 0);
    uout(&u, 4, 0x1A);
    CHECK((uin(&u, 6) & 0xF0) == 0x90);
    uout(&u, 4, 0x0B);
    uout(&u, 2, 0x01);
    CHECK((uin(&u, 2) & 0xC0) == 0xC0);
    /* Divisor latch. */
    uout(&u, 3, 0x83);
    uout(&u, 0, 1);
    uout(&u, 1, 0);
    CHECK(uin(&u, 0) == 1);
    uout(&u, 3, 0x03);
    /* Output. */
    for (const char *s = "ttyS0 ok\n"; *s; s++) {
        CHECK(uin(&u, 5) & 0x20);
        uout(&u, 0, (uint8_t)*s);
    }
    char buf[32] = {0};
    CHECK(read(p[0], buf, sizeof buf) == 9 && strcmp(buf, "ttyS0 ok\n") == 0);
    /* THRE interrupt: raised when enabled, cleared by reading IIR. */
    irq_changes = 0;
    uout(&u, 1, 0x02);
    CHECK(irq_level && (uin(&u, 2) & 0x0F) == 0x02);
    CHECK(!irq_level);
    /* Input and its interrupt. */
    uout(&u, 1, 0x01);
    CHECK(uart_receive(&u, (const uint8_t *)"ab", 2) == 2);
    CHECK(irq_level && (uin(&u, 5) & 1) && (uin(&u, 2) & 0x0F) == 0x04);
    CHECK(uin(&u, 0) == 'a' && uin(&u, 0) == 'b' && !(uin(&u, 5) & 1) && !irq_level);
    uint8_t big[100];
    memset(big, 'x', sizeof big);
    CHECK(uart_receive(&u, big, sizeof big) == UART_FIFO_SIZE);
    /* Odd accesses: a dword across the end, and ports that are not ours. */
    uint8_t w[4] = {0};
    CHECK(uart_io(&u, 0x3fe, false, w, 4));
    CHECK(!uart_io(&u, 0x400, false, w, 1));
    /* A full output pipe drops bytes instead of blocking. */
    static char fill[1 << 17];
    while (write(p[1], fill, sizeof fill) > 0)
        ;
    uout(&u, 0, 'z');
    close(p[0]);
    uout(&u, 0, 'z'); /* closed reader: EPIPE, not a crash (SIGPIPE ignored by main) */
    close(p[1]);
}


/* ---- saved state -------------------------------------------------------- */

static const struct virtio_console_port_spec test_ports[2] = {{.name = NULL, .is_console = true},
                                                              {.name = "org.clade.agent", .is_console = false}};

/* The console as a VMM starting from a snapshot has it: set up afresh in place, nothing restored yet. */
static void fresh_console(struct drv *d)
{
    CHECK(virtio_console_init(&d->con, test_ports, 2, &d->mem, drv_msi, d));
}

static bool same_state(const struct virtio_console *a, const struct virtio_console *b)
{
    struct virtio_console_state sa, sb;
    virtio_console_save(a, &sa);
    virtio_console_save(b, &sb);
    return memcmp(&sa, &sb, sizeof sa) == 0;
}

typedef void (*state_edit)(struct virtio_console_state *s);
static void edit_desc_outside_ram(struct virtio_console_state *s) { s->vp.queue[AGENT_TX].desc = DRV_RAM_SIZE; }
static void edit_used_wraps(struct virtio_console_state *s) { s->vp.queue[AGENT_RX].device = ~0ull - 8; }
static void edit_size_odd(struct virtio_console_state *s) { s->vp.queue[AGENT_RX].size = 48; }
static void edit_size_huge(struct virtio_console_state *s) { s->vp.queue[AGENT_RX].size = 1024; }
static void edit_vector(struct virtio_console_state *s) { s->vp.queue[0].msix_vector = 99; }
static void edit_config_vector(struct virtio_console_state *s) { s->vp.config_msix_vector = 17; }
static void edit_device_id(struct virtio_console_state *s) { s->vp.pci.config[PCI_DEVICE_ID] ^= 1; }
static void edit_bar_type(struct virtio_console_state *s) { s->vp.pci.config[PCI_BAR0] ^= 4; }
static void edit_flag(struct virtio_console_state *s) { s->port[AGENT].guest_open = 2; }
static void edit_owe_count(struct virtio_console_state *s) { s->port[AGENT].owe_open_count = 9; }
static void edit_sent_open(struct virtio_console_state *s) { s->port[AGENT].sent_open = 5; }
static void edit_console_flag(struct virtio_console_state *s) { s->port[AGENT].owe_console = 1; }
static void edit_nr_ports(struct virtio_console_state *s) { s->nr_ports = 4; }
static void edit_num_queues(struct virtio_console_state *s) { s->vp.num_queues = 16; }
static void edit_num_vectors(struct virtio_console_state *s) { s->vp.num_vectors = 200; }
static void edit_status(struct virtio_console_state *s) { s->vp.status &= (uint8_t)~VIRTIO_STATUS_FEATURES_OK; }
static void edit_features(struct virtio_console_state *s) { s->vp.driver_features |= 1ull << 40; }
static void edit_isr(struct virtio_console_state *s) { s->vp.isr = 0x80; }
static void edit_pending(struct virtio_console_state *s) { s->vp.msix_pending = 1u << 30; }
static void edit_msix_control(struct virtio_console_state *s) { s->vp.msix[1].control = 0xff; }
static void edit_msix_beyond(struct virtio_console_state *s) { s->vp.msix[VIRTIO_PCI_MAX_VECTORS - 1].data = 1; }
static void edit_queue_beyond(struct virtio_console_state *s) { s->vp.queue[VIRTIO_PCI_MAX_QUEUES - 1].desc = 0x1000; }
static void edit_disabled_ring(struct virtio_console_state *s)
{
    s->vp.queue[AGENT_TX].enabled = 0; /* a disabled queue with ring positions: never saved like that */
}
static void edit_broken(struct virtio_console_state *s) { s->vp.queue[AGENT_RX].vq.broken = 3; }
static void edit_reserved(struct virtio_console_state *s) { s->reserved[1] = 1; }
static void edit_port_reserved(struct virtio_console_state *s) { s->port[0].reserved[6] = 1; }
static void edit_unused_port(struct virtio_console_state *s) { s->port[3].guest_ready = 1; }

static void test_saved_state(void)
{
    struct drv *d = &D;
    int sv[2];
    int host = bring_up(d, sv);
    char buf[64] = {0};
    uint32_t id, len;
    send_tx(d, AGENT_TX, "before", 6);
    CHECK(read(host, buf, sizeof buf) == 6);
    uint64_t rx = drv_alloc(d, 32);
    uint32_t rx_len = 32;
    drv_add(d, AGENT_RX, &rx, &rx_len, 1, 0);
    drv_kick(d, AGENT_RX);
    /* A chain the device is still copying out when the state is saved: backpressure holds it. */
    struct virtio_console_state s;
    struct pci_bus_state bus;
    virtio_console_save(&d->con, &s);
    pci_bus_save(&d->bus, &bus);
    CHECK(s.vp.num_queues == 6 && s.nr_ports == 2 && s.port[AGENT].sent_open == 1);

    /* Hostile states: each refused, the fresh device left exactly as it was. */
    const state_edit edits[] = {edit_desc_outside_ram, edit_used_wraps, edit_size_odd, edit_size_huge, edit_vector,
                                edit_config_vector, edit_device_id, edit_bar_type, edit_flag, edit_owe_count, edit_sent_open,
                                edit_console_flag, edit_nr_ports, edit_num_queues, edit_num_vectors, edit_status,
                                edit_features, edit_isr, edit_pending, edit_msix_control, edit_msix_beyond,
                                edit_queue_beyond, edit_disabled_ring, edit_broken, edit_reserved, edit_port_reserved,
                                edit_unused_port};
    static struct virtio_console pristine;
    fresh_console(d);
    pristine = d->con;
    for (size_t i = 0; i < sizeof edits / sizeof edits[0]; i++) {
        struct virtio_console_state t = s;
        edits[i](&t);
        bool refused = !virtio_console_restore(&d->con, &t);
        if (!refused)
            fprintf(stderr, "  hostile state %zu was accepted\n", i);
        CHECK(refused);
        CHECK(same_state(&d->con, &pristine));
    }
    struct pci_bus_state bad_bus = bus;
    bad_bus.config_address = 0x3;
    CHECK(!pci_bus_restore(&d->bus, &bad_bus));
    bad_bus = bus;
    bad_bus.host_bridge.config[PCI_VENDOR_ID] ^= 0xff;
    CHECK(!pci_bus_restore(&d->bus, &bad_bus));

    /* The real state: restored, then the guest hears its host end went away and came back, and data flows. */
    CHECK(pci_bus_restore(&d->bus, &bus));
    CHECK(virtio_console_restore(&d->con, &s));
    CHECK(d->con.port[AGENT].fd == -1 && d->con.port[AGENT].out_len == 0);
    int sv2[2];
    CHECK(socketpair(AF_UNIX, SOCK_STREAM, 0, sv2) == 0);
    virtio_console_port_set_fd(&d->con, AGENT, sv2[0]);
    CHECK(expect_control(d, AGENT, VIRTIO_CONSOLE_PORT_OPEN, 0));
    CHECK(expect_control(d, AGENT, VIRTIO_CONSOLE_PORT_OPEN, 1));
    CHECK(write(sv2[1], "after", 5) == 5);
    virtio_console_port_io(&d->con, AGENT);
    CHECK(drv_used(d, AGENT_RX, &id, &len) && len == 5 && memcmp(ram + rx, "after", 5) == 0);
    send_tx(d, AGENT_TX, "again", 5);
    memset(buf, 0, sizeof buf);
    CHECK(read(sv2[1], buf, sizeof buf) == 5 && memcmp(buf, "again", 5) == 0);
    close(sv[0]);
    close(sv[1]);
    close(sv2[0]);
    close(sv2[1]);

    /* The UART's registers and FIFO, and values its registers cannot hold. */
    struct uart8250 u, v;
    struct uart_state us;
    uart_init(&u, UART_COM1_BASE, -1, NULL, NULL);
    uout(&u, 1, 0x03);
    uart_receive(&u, (const uint8_t *)"xyz", 3);
    uart_save(&u, &us);
    uart_init(&v, UART_COM1_BASE, -1, NULL, NULL);
    CHECK(uart_restore(&v, &us) && uin(&v, 1) == 0x03 && uin(&v, 0) == 'x');
    struct uart_state bad = us;
    bad.rx_head = UART_FIFO_SIZE;
    CHECK(!uart_restore(&v, &bad));
    bad = us;
    bad.rx_count = UART_FIFO_SIZE + 1;
    CHECK(!uart_restore(&v, &bad));
    bad = us;
    bad.ier = 0xf0;
    CHECK(!uart_restore(&v, &bad));
    bad = us;
    bad.thre_pending = 2;
    CHECK(!uart_restore(&v, &bad));
}

/* The CMOS clock: BCD time from the host, the index register as its only state. */
static void test_cmos(void)
{
    struct cmos c, d;
    struct cmos_state cs;
    uint8_t b = 0x0b | 0x80; /* register B, with the NMI-mask bit set as Linux does */
    cmos_init(&c);
    CHECK(cmos_io(&c, CMOS_INDEX_PORT, true, &b, 1) && c.index == 0x0b);
    CHECK(cmos_io(&c, CMOS_DATA_PORT, false, &b, 1) && b == 0x02); /* 24-hour, BCD */
    b = 0x00;
    cmos_io(&c, CMOS_INDEX_PORT, true, &b, 1);
    CHECK(cmos_io(&c, CMOS_DATA_PORT, false, &b, 1) && (b & 0x0f) <= 9 && (b >> 4) <= 5); /* seconds in BCD */
    CHECK(!cmos_io(&c, CMOS_DATA_PORT, false, &b, 2) && !cmos_io(&c, 0x72, false, &b, 1));
    b = 0x32;
    cmos_io(&c, CMOS_INDEX_PORT, true, &b, 1);
    cmos_save(&c, &cs);
    cmos_init(&d);
    CHECK(cmos_restore(&d, &cs) && d.index == 0x32 && cmos_io(&d, CMOS_DATA_PORT, false, &b, 1) && b == 0x20); /* century */
    struct cmos_state bad = cs;
    bad.index = 0x80;
    CHECK(!cmos_restore(&d, &bad) && d.index == 0x32);
    bad = cs;
    bad.reserved[6] = 1;
    CHECK(!cmos_restore(&d, &bad));
}

/* ---- the read-only disk ------------------------------------------------- */

#define BLK_SECTORS 8
#define BLK_FILE_BYTES (BLK_SECTORS * 512 + 100) /* a partial last sector is not offered */
#define BLK_FEATURES (VIRTIO_FEATURE_VERSION_1 | 1ull << VIRTIO_BLK_F_RO | 1ull << VIRTIO_BLK_F_SEG_MAX)

static uint8_t disk_byte(uint64_t at) { return (uint8_t)(at * 7 + at / 512); }

static int make_disk(void)
{
    char path[] = "/tmp/clade-devices-test-XXXXXX";
    int fd = mkstemp(path);
    if (fd < 0)
        return -1;
    unlink(path);
    uint8_t buf[BLK_FILE_BYTES];
    for (unsigned i = 0; i < sizeof buf; i++)
        buf[i] = disk_byte(i);
    if (write(fd, buf, sizeof buf) != (ssize_t)sizeof buf)
        return close(fd), -1;
    char self[64];
    snprintf(self, sizeof self, "/proc/self/fd/%d", fd);
    int ro = open(self, O_RDONLY | O_CLOEXEC); /* the device gets a read-only descriptor, as in the VMM */
    close(fd);
    return ro;
}

struct blk_req {
    uint64_t hdr, data, status;
};

/* Posts header + data split into pieces of `piece` bytes (0: one piece) + status; returns the addresses. */
static struct blk_req blk_post(struct drv *d, uint32_t type, uint64_t sector, uint32_t data_len, uint32_t piece)
{
    struct blk_req r = {.hdr = drv_alloc(d, 16), .data = data_len ? drv_alloc(d, data_len) : 0, .status = drv_alloc(d, 1)};
    uint8_t hdr[16] = {0};
    pci_put_le(hdr, 4, type);
    pci_put_le(hdr + 8, 8, sector);
    memcpy(ram + r.hdr, hdr, 16);
    memset(ram + r.data, 0xEE, data_len);
    ram[r.status] = 0xAA;
    uint64_t addr[8] = {r.hdr};
    uint32_t len[8] = {16};
    unsigned n = 1;
    for (uint32_t off = 0; off < data_len && n < 7; n++) {
        uint32_t l = piece && piece < data_len - off ? piece : data_len - off;
        addr[n] = r.data + off, len[n] = l;
        off += l;
    }
    addr[n] = r.status, len[n] = 1;
    drv_add(d, 0, addr, len, n + 1, 1);
    drv_kick(d, 0);
    return r;
}

static bool blk_done(struct drv *d, uint32_t *used_len)
{
    uint32_t id;
    return drv_used(d, 0, &id, used_len);
}

static bool disk_matches(const uint8_t *p, uint64_t at, uint32_t len)
{
    for (uint32_t i = 0; i < len; i++)
        if (p[i] != disk_byte(at + i))
            return false;
    return true;
}

static void blk_setup(struct drv *d, int fd)
{
    CHECK(drv_create_blk(d, ram, fd, BLK_FILE_BYTES));
    CHECK(drv_probe_device(d, 0x1042));
    CHECK(drv_start(d, BLK_FEATURES));
}

static void test_blk_requests(int fd)
{
    struct drv *d = &D;
    blk_setup(d, fd);
    /* What the guest sees: read-only, capacity in whole sectors, one queue. */
    drv_mw(d, d->common + 0x00, 4, 0);
    CHECK(drv_mr(d, d->common + 0x04, 4) & (1u << VIRTIO_BLK_F_RO));
    CHECK(drv_mr(d, d->devcfg, 4) == BLK_SECTORS && drv_mr(d, d->devcfg + 4, 4) == 0);
    CHECK(drv_mr(d, d->common + 0x04, 4) & (1u << VIRTIO_BLK_F_SEG_MAX));
    CHECK(drv_mr(d, d->devcfg + 12, 4) == VBLK_QUEUE_SIZE - 2 && drv_mr(d, d->devcfg + 16, 4) == 0);
    CHECK(drv_mr(d, d->common + 0x12, 2) == 1);
    uint32_t used;
    /* A read split over three buffers. */
    struct blk_req r = blk_post(d, VIRTIO_BLK_T_IN, 2, 1024, 300);
    CHECK(blk_done(d, &used) && used == 1025);
    CHECK(ram[r.status] == VIRTIO_BLK_S_OK && disk_matches(ram + r.data, 1024, 1024));
    /* The last whole sector. */
    r = blk_post(d, VIRTIO_BLK_T_IN, BLK_SECTORS - 1, 512, 0);
    CHECK(blk_done(d, &used) && used == 513 && ram[r.status] == VIRTIO_BLK_S_OK &&
          disk_matches(ram + r.data, (BLK_SECTORS - 1) * 512, 512));
    /* Its id, whole and cut short. */
    r = blk_post(d, VIRTIO_BLK_T_GET_ID, 0, 20, 0);
    CHECK(blk_done(d, &used) && used == 21 && ram[r.status] == VIRTIO_BLK_S_OK && !memcmp(ram + r.data, "clade-test-disk\0\0\0\0", 20));
    r = blk_post(d, VIRTIO_BLK_T_GET_ID, 0, 5, 0);
    CHECK(blk_done(d, &used) && used == 6 && !memcmp(ram + r.data, "clade", 5));
    /* Writes, flushes and unknown requests change nothing. */
    struct {
        uint32_t type;
        uint8_t status;
    } refused[] = {{VIRTIO_BLK_T_OUT, VIRTIO_BLK_S_IOERR}, {VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_S_UNSUPP},
                   {VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_S_UNSUPP}, {0xFFFFFFFFu, VIRTIO_BLK_S_UNSUPP}};
    for (size_t i = 0; i < sizeof refused / sizeof refused[0]; i++) {
        r = blk_post(d, refused[i].type, 0, 512, 0);
        CHECK(blk_done(d, &used) && used == 1 && ram[r.status] == refused[i].status);
    }
    /* A write given as device-readable data (as a driver would send it). */
    uint64_t hdr = drv_alloc(d, 16), data = drv_alloc(d, 512), st = drv_alloc(d, 1);
    memset(ram + hdr, 0, 16);
    ram[hdr] = VIRTIO_BLK_T_OUT;
    memset(ram + data, 0x55, 512);
    uint64_t wa[3] = {hdr, data, st};
    uint32_t wl[3] = {16, 512, 1};
    drv_add(d, 0, wa, wl, 3, 2);
    drv_kick(d, 0);
    CHECK(blk_done(d, &used) && used == 1 && ram[st] == VIRTIO_BLK_S_IOERR);
    uint8_t file[BLK_FILE_BYTES];
    CHECK(pread(fd, file, sizeof file, 0) == (ssize_t)sizeof file && disk_matches(file, 0, sizeof file));
    /* Out-of-range and wrapping sectors: refused, nothing read. */
    uint64_t bad_sectors[][2] = {{BLK_SECTORS, 512},      {BLK_SECTORS - 1, 1024}, {1ull << 55, 512},
                                 {~0ull, 512},            {~0ull / 512 + 1, 512},  {BLK_SECTORS + 1, 0}};
    for (size_t i = 0; i < sizeof bad_sectors / sizeof bad_sectors[0]; i++) {
        r = blk_post(d, VIRTIO_BLK_T_IN, bad_sectors[i][0], (uint32_t)bad_sectors[i][1], 0);
        bool refused_ok = blk_done(d, &used) && used == 1 && ram[r.status] == VIRTIO_BLK_S_IOERR;
        if (!refused_ok)
            fprintf(stderr, "  bad sector %llu not refused\n", (unsigned long long)bad_sectors[i][0]);
        CHECK(refused_ok);
        CHECK(bad_sectors[i][1] == 0 || ram[r.data] == 0xEE);
    }
    /* The partial sector past the capacity is never read. */
    r = blk_post(d, VIRTIO_BLK_T_IN, BLK_SECTORS - 1, 612, 0);
    CHECK(blk_done(d, &used) && used == 1 && ram[r.status] == VIRTIO_BLK_S_IOERR);
    /* Chains with no status byte or a short header come back with nothing written. */
    uint64_t a = drv_alloc(d, 16);
    uint32_t l = 16;
    drv_add(d, 0, &a, &l, 1, 1);
    drv_kick(d, 0);
    CHECK(blk_done(d, &used) && used == 0);
    uint64_t sa[2] = {drv_alloc(d, 8), drv_alloc(d, 1)};
    uint32_t sl[2] = {8, 1};
    ram[sa[1]] = 0xAA;
    drv_add(d, 0, sa, sl, 2, 1);
    drv_kick(d, 0);
    CHECK(blk_done(d, &used) && used == 0 && ram[sa[1]] == 0xAA);
    /* A header split across descriptors is still one header. */
    uint64_t h1 = drv_alloc(d, 16), buf = drv_alloc(d, 512), s1 = drv_alloc(d, 1);
    memset(ram + h1, 0, 16);
    ram[h1] = VIRTIO_BLK_T_IN;
    ram[h1 + 8] = 3;
    uint64_t ha[4] = {h1, h1 + 5, buf, s1};
    uint32_t hl[4] = {5, 11, 512, 1};
    drv_add(d, 0, ha, hl, 4, 2);
    drv_kick(d, 0);
    CHECK(blk_done(d, &used) && used == 513 && ram[s1] == VIRTIO_BLK_S_OK && disk_matches(ram + buf, 3 * 512, 512));
    CHECK(!(drv_status(d) & VIRTIO_STATUS_NEEDS_RESET));
    CHECK(d->blk.reads == 5);
}

static void test_blk_hostile(int fd)
{
    struct drv *d = &D;
    struct {
        const char *what;
        uint64_t addr;
        uint32_t len;
        uint16_t flags, next;
    } cases[] = {
        {"descriptor loop", 0x80000, 16, VIRTQ_DESC_F_NEXT, 0},
        {"data length wraps", 0x80000, 0xFFFFFFFFu, VIRTQ_DESC_F_WRITE, 0},
        {"address wraps", ~0ull - 4, 16, 0, 0},
        {"next beyond queue", 0x80000, 16, VIRTQ_DESC_F_NEXT, DRV_QSIZE},
        {"indirect", 0x80000, 16, VIRTQ_DESC_F_INDIRECT, 0},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        blk_setup(d, fd);
        unsigned before = d->msi_count;
        write_desc(d, 0, 0, cases[i].addr, cases[i].len, cases[i].flags, cases[i].next);
        publish(d, 0, 0, 1);
        expect_broken(d, 0, before, cases[i].what);
        CHECK(d->blk.reads == 0);
    }
    /* Two writable buffers that together pass 4 GiB (both inside "RAM" by aliasing) are refused as one chain. */
    blk_setup(d, fd);
    unsigned before = d->msi_count;
    write_desc(d, 0, 0, 0x80000, 16, VIRTQ_DESC_F_NEXT, 1);
    for (uint16_t i = 1; i < DRV_QSIZE; i++)
        write_desc(d, 0, i, 0, DRV_RAM_SIZE, VIRTQ_DESC_F_WRITE | (i + 1 < DRV_QSIZE ? VIRTQ_DESC_F_NEXT : 0), (uint16_t)(i + 1));
    publish(d, 0, 0, 1);
    uint32_t used;
    CHECK(!blk_done(d, &used) || used <= 1); /* 63 MiB of aliases is legal: served or refused, never overrun */
    (void)before;
    /* Queue notifications for queues the disk does not have do nothing. */
    drv_kick(d, 5);
    drv_kick(d, 0xFFFF);
}

static void test_blk_saved_state(int fd)
{
    struct drv *d = &D;
    blk_setup(d, fd);
    struct blk_req r = blk_post(d, VIRTIO_BLK_T_IN, 0, 512, 0);
    uint32_t used;
    CHECK(blk_done(d, &used));
    (void)r;
    struct virtio_blk_state s;
    virtio_blk_save(&d->blk, &s);
    static struct virtio_blk fresh, other;
    struct guest_mem mem = d->mem;
    CHECK(virtio_blk_init(&fresh, fd, BLK_FILE_BYTES, "clade-test-disk", &mem, drv_msi, d));
    CHECK(virtio_blk_restore(&fresh, &s));
    struct virtio_blk_state again;
    virtio_blk_save(&fresh, &again);
    CHECK(memcmp(&s, &again, sizeof s) == 0);
    /* A different disk (another size) is refused, and so is a hostile transport state. */
    CHECK(virtio_blk_init(&other, fd, BLK_FILE_BYTES - 512, "clade-test-disk", &mem, drv_msi, d));
    CHECK(!virtio_blk_restore(&other, &s));
    struct virtio_blk_state bad = s;
    bad.vp.queue[0].desc = DRV_RAM_SIZE;
    CHECK(!virtio_blk_restore(&fresh, &bad));
    bad = s;
    bad.vp.num_queues = 2;
    CHECK(!virtio_blk_restore(&fresh, &bad));
    /* Bad set-up values are refused. */
    CHECK(!virtio_blk_init(&other, -1, BLK_FILE_BYTES, NULL, &mem, drv_msi, d));
    CHECK(!virtio_blk_init(&other, fd, 100, NULL, &mem, drv_msi, d));
    CHECK(!virtio_blk_init(&other, fd, BLK_FILE_BYTES, "an id longer than twenty bytes", &mem, drv_msi, d));
}

static void test_blk(void)
{
    int fd = make_disk();
    CHECK(fd >= 0);
    if (fd < 0)
        return;
    test_blk_requests(fd);
    test_blk_hostile(fd);
    test_blk_saved_state(fd);
    close(fd);
}

/* ---- virtio-net ------------------------------------------------------- */

#define NET_RX 0
#define NET_TX 1
#define NET_FEATURES (VIRTIO_FEATURE_VERSION_1 | 1ull << 5 /* MAC */ | 1ull << 16 /* STATUS */)
#define NET_HDR 12

static const uint8_t net_mac[6] = {0x52, 0x54, 0x00, 0xc1, 0xad, 0x0f};

/* A NIC brought up by the driver and connected to one end of a socket pair; returns the host (network process) end. */
static int net_setup(struct drv *d, int sv[2])
{
    CHECK(drv_create_net(d, ram));
    CHECK(drv_probe_device(d, 0x1041));
    CHECK(drv_start(d, NET_FEATURES));
    CHECK(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) == 0);
    virtio_net_set_fd(&d->net, sv[0]);
    return sv[1];
}

static void net_teardown(int sv[2])
{
    close(sv[0]);
    close(sv[1]);
}

static uint8_t frame_byte(unsigned seq, unsigned i) { return (uint8_t)(seq * 31 + i * 7 + 1); }

/* Posts a frame to transmit: header and frame in one buffer, or split after the header. */
static void net_send(struct drv *d, unsigned seq, uint32_t frame_len, bool split)
{
    uint64_t a = drv_alloc(d, NET_HDR + frame_len);
    memset(ram + a, 0xEE, NET_HDR); /* the transmit header is ignored */
    for (uint32_t i = 0; i < frame_len; i++)
        ram[a + NET_HDR + i] = frame_byte(seq, i);
    if (split) {
        uint64_t addr[2] = {a, a + NET_HDR};
        uint32_t len[2] = {NET_HDR, frame_len};
        drv_add(d, NET_TX, addr, len, 2, 2);
    } else {
        uint32_t len = NET_HDR + frame_len;
        drv_add(d, NET_TX, &a, &len, 1, 1);
    }
    drv_kick(d, NET_TX);
}

/* Writes one prefixed frame to the host end. */
static void host_send(int fd, unsigned seq, uint32_t prefix, uint32_t frame_len)
{
    static uint8_t buf[4 + 70000];
    buf[0] = (uint8_t)(prefix >> 24), buf[1] = (uint8_t)(prefix >> 16), buf[2] = (uint8_t)(prefix >> 8), buf[3] = (uint8_t)prefix;
    for (uint32_t i = 0; i < frame_len; i++)
        buf[4 + i] = frame_byte(seq, i);
    CHECK(write(fd, buf, 4 + frame_len) == (ssize_t)(4 + frame_len));
}

/* Reads exactly len bytes the device wrote to the host end (non-blocking: all must be there). */
static bool host_read(int fd, uint8_t *buf, size_t len)
{
    size_t done = 0;
    while (done < len) {
        ssize_t n = recv(fd, buf + done, len - done, MSG_DONTWAIT);
        if (n <= 0)
            return false;
        done += (size_t)n;
    }
    return true;
}

static bool host_has_nothing(int fd)
{
    uint8_t b;
    return recv(fd, &b, 1, MSG_DONTWAIT | MSG_PEEK) < 0 && errno == EAGAIN;
}

static bool frame_matches(const uint8_t *p, unsigned seq, uint32_t len)
{
    for (uint32_t i = 0; i < len; i++)
        if (p[i] != frame_byte(seq, i))
            return false;
    return true;
}

static bool host_expect_frame(int fd, unsigned seq, uint32_t len)
{
    static uint8_t buf[4 + 65535];
    if (!host_read(fd, buf, 4))
        return false;
    uint32_t got = (uint32_t)buf[0] << 24 | (uint32_t)buf[1] << 16 | (uint32_t)buf[2] << 8 | buf[3];
    return got == len && host_read(fd, buf + 4, len) && frame_matches(buf + 4, seq, len);
}

/* Reads what the host end holds and counts the whole frames in it, numbered from seq on; a partial one waits for the next call. */
static unsigned host_take_frames(int fd, unsigned seq, uint32_t len)
{
    static uint8_t acc[1 << 18];
    static size_t have;
    ssize_t n = recv(fd, acc + have, sizeof acc - have, MSG_DONTWAIT);
    if (n > 0)
        have += (size_t)n;
    unsigned frames = 0;
    size_t at = 0;
    while (have - at >= 4 + len) {
        uint32_t got = (uint32_t)acc[at] << 24 | (uint32_t)acc[at + 1] << 16 | (uint32_t)acc[at + 2] << 8 | acc[at + 3];
        if (got != len || !frame_matches(acc + at + 4, seq + frames, len))
            break; /* out of order or damaged: the count stops short */
        at += 4 + len;
        frames++;
    }
    memmove(acc, acc + at, have - at);
    have -= at;
    return frames;
}

/* Posts a receive buffer of len bytes (split into header and the rest when asked); returns its address. */
static uint64_t net_post_rx(struct drv *d, uint32_t len, bool split)
{
    uint64_t a = drv_alloc(d, len);
    memset(ram + a, 0xCC, len);
    if (split) {
        uint64_t addr[2] = {a, a + NET_HDR};
        uint32_t lens[2] = {NET_HDR, len - NET_HDR};
        drv_add(d, NET_RX, addr, lens, 2, 0);
    } else {
        drv_add(d, NET_RX, &a, &len, 1, 0);
    }
    drv_kick(d, NET_RX);
    return a;
}

static bool rx_header_ok(const uint8_t *h)
{
    static const uint8_t want[NET_HDR] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0}; /* num_buffers = 1 */
    return memcmp(h, want, NET_HDR) == 0;
}

static void test_net_negotiation(void)
{
    struct drv *d = &D;
    CHECK(drv_create_net(d, ram));
    CHECK(drv_probe_device(d, 0x1041));
    CHECK(drv_cfg_read(d, d->slot, 0x0A, 2) == 0x0200); /* class: Ethernet controller */
    drv_mw(d, d->common + 0x00, 4, 0);
    CHECK(drv_mr(d, d->common + 0x04, 4) == (1u << 5 | 1u << 16));
    drv_mw(d, d->common + 0x00, 4, 1);
    CHECK(drv_mr(d, d->common + 0x04, 4) == 1u); /* VERSION_1 */
    CHECK(!drv_start(d, NET_FEATURES | 1ull << 0)); /* CSUM is not offered */
    CHECK(!drv_start(d, NET_FEATURES | 1ull << 22)); /* nor a control queue (CTRL_VQ) */
    CHECK(!drv_start(d, 1ull << 5)); /* nor a legacy driver */
    CHECK(drv_start(d, NET_FEATURES));
    CHECK(drv_mr(d, d->common + 0x12, 2) == 2); /* receive and transmit, no control queue */
    for (unsigned i = 0; i < 6; i++)
        CHECK(drv_mr(d, d->devcfg + i, 1) == net_mac[i]);
    CHECK(drv_mr(d, d->devcfg + 6, 2) == 1); /* link up */
    drv_mw(d, d->devcfg, 4, 0xFFFFFFFF);
    CHECK(drv_mr(d, d->devcfg, 1) == 0x52); /* the MAC is read-only */
    CHECK(virtio_net_poll_events(&d->net) == 0); /* nothing connected */
}

static void test_net_traffic(void)
{
    struct drv *d = &D;
    int sv[2];
    int host = net_setup(d, sv);
    uint32_t id, len;
    /* Transmit: each frame arrives with its big-endian length prefix, the header stripped. */
    net_send(d, 1, 60, false);
    net_send(d, 2, 1514, true);
    net_send(d, 3, 14, false);
    CHECK(host_expect_frame(host, 1, 60));
    CHECK(host_expect_frame(host, 2, 1514));
    CHECK(host_expect_frame(host, 3, 14));
    CHECK(host_has_nothing(host));
    unsigned used = 0;
    while (drv_used(d, NET_TX, &id, &len))
        used += len == 0;
    CHECK(used == 3 && d->net.tx_frames == 3);
    /* Receive: a frame written by the host lands whole in one posted buffer, after the header. */
    unsigned msi = d->msi_count;
    uint64_t a = net_post_rx(d, NET_HDR + 1514, false);
    CHECK(virtio_net_poll_events(&d->net) & POLLIN);
    host_send(host, 7, 100, 100);
    virtio_net_io(&d->net); /* the socket polled readable */
    CHECK(drv_used(d, NET_RX, &id, &len) && len == NET_HDR + 100 && rx_header_ok(ram + a) && frame_matches(ram + a + NET_HDR, 7, 100));
    CHECK(got_msi(d, 1 + NET_RX, msi));
    /* Several frames in one read, into buffers split after the header; a 64 KiB frame too. */
    uint64_t b1 = net_post_rx(d, NET_HDR + 200, true), b2 = net_post_rx(d, NET_HDR + 65535, true);
    host_send(host, 8, 200, 200);
    host_send(host, 9, 65535, 65535);
    for (unsigned i = 0; i < 8; i++)
        virtio_net_io(&d->net);
    CHECK(drv_used(d, NET_RX, &id, &len) && len == NET_HDR + 200 && rx_header_ok(ram + b1) && frame_matches(ram + b1 + NET_HDR, 8, 200));
    CHECK(drv_used(d, NET_RX, &id, &len) && len == NET_HDR + 65535 && rx_header_ok(ram + b2) &&
          frame_matches(ram + b2 + NET_HDR, 9, 65535));
    CHECK(d->net.rx_frames == 3);
    net_teardown(sv);
}

static void test_net_rx_backpressure(void)
{
    struct drv *d = &D;
    int sv[2];
    int host = net_setup(d, sv);
    uint32_t id, len;
    /* No receive buffers: the socket is not even read, so the network process feels the backpressure. */
    for (unsigned i = 0; i < 3; i++)
        host_send(host, 20 + i, 300, 300);
    virtio_net_io(&d->net);
    drv_kick(d, NET_RX);
    int pending = 0;
    CHECK(ioctl(sv[0], FIONREAD, &pending) == 0 && pending == 3 * 304);
    CHECK(!(virtio_net_poll_events(&d->net) & POLLIN));
    /* One buffer: frames move one at a time, the rest wait (buffered, bounded by the device). */
    uint64_t a = net_post_rx(d, 1526, false);
    CHECK(drv_used(d, NET_RX, &id, &len) && len == NET_HDR + 300 && frame_matches(ram + a + NET_HDR, 20, 300));
    CHECK(!drv_used(d, NET_RX, &id, &len));
    a = net_post_rx(d, 1526, false);
    CHECK(drv_used(d, NET_RX, &id, &len) && len == NET_HDR + 300 && frame_matches(ram + a + NET_HDR, 21, 300));
    a = net_post_rx(d, 1526, false);
    CHECK(drv_used(d, NET_RX, &id, &len) && len == NET_HDR + 300 && frame_matches(ram + a + NET_HDR, 22, 300));
    net_teardown(sv);
}

/* The network process stops reading: the device must stall the guest's transmit queue, not grow. */
static void test_net_tx_backpressure(void)
{
    struct drv *d = &D;
    int sv[2];
    int host = net_setup(d, sv);
    int small = 4096;
    setsockopt(sv[0], SOL_SOCKET, SO_SNDBUF, &small, sizeof small);
    enum { TOTAL = 600, FRAME = 1500 };
    unsigned posted = 0, done = 0, received = 0;
    uint32_t id, len;
    while (posted - done < DRV_QSIZE && posted < TOTAL) {
        net_send(d, posted, FRAME, false); /* one descriptor each: the ring holds DRV_QSIZE of them */
        posted++;
        while (drv_used(d, NET_TX, &id, &len))
            done++;
    }
    CHECK(posted - done == DRV_QSIZE && posted < TOTAL); /* stalled with the ring full */
    CHECK(d->net.out_len <= VNET_TX_BUF_SIZE && d->net.out_len > VNET_TX_BUF_SIZE / 2);
    CHECK(virtio_net_poll_events(&d->net) & POLLOUT);
    drv_kick(d, NET_TX);
    CHECK(!drv_used(d, NET_TX, &id, &len)); /* a kick changes nothing while the socket is full */
    /* The network process reads again: every frame arrives, in order (each frame's bytes depend on its number), intact. */
    for (unsigned round = 0; round < 100000 && received < TOTAL; round++) {
        received += host_take_frames(host, received, FRAME);
        virtio_net_io(&d->net); /* the socket polled writable */
        while (drv_used(d, NET_TX, &id, &len))
            done++;
        while (posted - done < DRV_QSIZE && posted < TOTAL) {
            net_send(d, posted, FRAME, false);
            posted++;
        }
    }
    if (received != TOTAL || done != TOTAL)
        fprintf(stderr, "  transmit: %u posted, %u used, %u received, %zu bytes queued, %lu sent\n", posted, done, received,
                d->net.out_len, (unsigned long)d->net.tx_frames);
    CHECK(received == TOTAL && done == TOTAL);
    CHECK(host_has_nothing(host) && d->net.out_len == 0 && d->net.tx_frames == TOTAL);
    net_teardown(sv);
}

static void test_net_hostile_tx(void)
{
    struct drv *d = &D;
    int sv[2];
    int host = net_setup(d, sv);
    uint32_t id, len;
    net_send(d, 1, 13, false);    /* shorter than an Ethernet header */
    net_send(d, 2, 65536, false); /* longer than the framing allows */
    uint64_t a = drv_alloc(d, 8), w = drv_alloc(d, 100);
    uint32_t l = 8, wl = 100;
    drv_add(d, NET_TX, &a, &l, 1, 1); /* not even a header */
    drv_add(d, NET_TX, &w, &wl, 1, 0); /* only a writable buffer */
    drv_kick(d, NET_TX);
    unsigned used = 0;
    while (drv_used(d, NET_TX, &id, &len))
        used++;
    CHECK(used == 4 && d->net.tx_dropped == 4 && d->net.tx_frames == 0 && host_has_nothing(host));
    net_send(d, 3, 60, false); /* and the device still works */
    CHECK(host_expect_frame(host, 3, 60));
    /* Rings: a descriptor loop, a buffer outside RAM, an index beyond the ring. */
    static const struct { uint64_t addr; uint32_t len; uint16_t flags, next, step; const char *what; } cases[] = {
        {0x80000, 100, VIRTQ_DESC_F_NEXT, 0, 1, "descriptor loop"},
        {DRV_RAM_SIZE - 10, 100, 0, 0, 1, "buffer past RAM"},
        {~0ull - 50, 100, 0, 0, 1, "address wraps"},
        {0x80000, 100, 0, 0, 200, "avail index beyond the ring"},
        {0x80000, 100, VIRTQ_DESC_F_NEXT, 999, 1, "next out of range"},
    };
    for (unsigned i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        net_teardown(sv);
        host = net_setup(d, sv);
        unsigned msi = d->msi_count;
        write_desc(d, NET_TX, 0, cases[i].addr, cases[i].len, cases[i].flags, cases[i].next);
        publish(d, NET_TX, 0, cases[i].step);
        expect_broken(d, NET_TX, msi, cases[i].what);
        CHECK(host_has_nothing(host));
    }
    net_teardown(sv);
}

static void test_net_hostile_rx(void)
{
    struct drv *d = &D;
    int sv[2];
    int host = net_setup(d, sv);
    uint32_t id, len;
    /* A frame shorter than an Ethernet header and one too big for the buffer are dropped; the buffer waits for the next. */
    uint64_t a = net_post_rx(d, NET_HDR + 100, false);
    host_send(host, 1, 10, 10);
    host_send(host, 2, 500, 500);
    host_send(host, 3, 0, 0);
    host_send(host, 4, 80, 80);
    virtio_net_io(&d->net);
    CHECK(drv_used(d, NET_RX, &id, &len) && len == NET_HDR + 80 && frame_matches(ram + a + NET_HDR, 4, 80));
    CHECK(d->net.rx_dropped == 3 && d->net.rx_frames == 1);
    /* A buffer too short for even the header gets nothing either. */
    uint64_t tiny = drv_alloc(d, 8);
    uint32_t tl = 8;
    drv_add(d, NET_RX, &tiny, &tl, 1, 0);
    drv_kick(d, NET_RX);
    host_send(host, 5, 60, 60);
    virtio_net_io(&d->net);
    CHECK(!drv_used(d, NET_RX, &id, &len) && d->net.rx_dropped == 4);
    net_teardown(sv);

    /* A length prefix above 65535 breaks the stream: the connection is dropped, nothing delivered, nothing crashes. */
    host = net_setup(d, sv);
    net_post_rx(d, 1526, false);
    host_send(host, 6, 65536, 0);
    virtio_net_io(&d->net);
    CHECK(d->net.fd == -1 && virtio_net_take_hungup_fd(&d->net) == sv[0] && d->net.hangup_reason);
    CHECK(!drv_used(d, NET_RX, &id, &len) && virtio_net_poll_events(&d->net) == 0);
    net_send(d, 7, 60, false); /* transmitting with nobody there drops the frame, returns the buffer */
    CHECK(drv_used(d, NET_TX, &id, &len) && d->net.tx_dropped == 1);
    net_teardown(sv);

    /* A truncated frame, then EOF: the partial frame never reaches the guest. */
    host = net_setup(d, sv);
    net_post_rx(d, 1526, false);
    host_send(host, 8, 100, 50);
    shutdown(host, SHUT_WR);
    virtio_net_io(&d->net);
    CHECK(d->net.fd == -1 && virtio_net_take_hungup_fd(&d->net) == sv[0] && !drv_used(d, NET_RX, &id, &len));
    net_teardown(sv);

    /* A driver reset between halves of a frame keeps the stream framed: the frame arrives whole afterwards. */
    host = net_setup(d, sv);
    net_post_rx(d, 1526, false);
    uint8_t half[4 + 40] = {0, 0, 0, 80};
    for (unsigned i = 0; i < 40; i++)
        half[4 + i] = frame_byte(9, i);
    CHECK(write(host, half, sizeof half) == sizeof half);
    virtio_net_io(&d->net);
    CHECK(!drv_used(d, NET_RX, &id, &len));
    CHECK(drv_start(d, NET_FEATURES));
    uint8_t rest[40];
    for (unsigned i = 0; i < 40; i++)
        rest[i] = frame_byte(9, 40 + i);
    CHECK(write(host, rest, sizeof rest) == sizeof rest);
    a = net_post_rx(d, 1526, false);
    CHECK(drv_used(d, NET_RX, &id, &len) && len == NET_HDR + 80 && frame_matches(ram + a + NET_HDR, 9, 80));
    /* A new host end (a forked child's) starts a new stream: the old one's half frame is gone. */
    CHECK(write(host, half, sizeof half) == sizeof half);
    virtio_net_io(&d->net);
    int sv2[2];
    CHECK(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv2) == 0);
    virtio_net_set_fd(&d->net, sv2[0]);
    host_send(sv2[1], 10, 70, 70);
    a = net_post_rx(d, 1526, false);
    CHECK(drv_used(d, NET_RX, &id, &len) && len == NET_HDR + 70 && frame_matches(ram + a + NET_HDR, 10, 70));
    net_send(d, 11, 60, false);
    CHECK(host_expect_frame(sv2[1], 11, 60) && host_has_nothing(host));
    net_teardown(sv2);
    net_teardown(sv);
}

static void test_net_saved_state(void)
{
    struct drv *d = &D;
    int sv[2];
    int host = net_setup(d, sv);
    uint32_t id, len;
    net_send(d, 1, 60, false);
    CHECK(host_expect_frame(host, 1, 60) && drv_used(d, NET_TX, &id, &len));
    struct virtio_net_state s;
    virtio_net_save(&d->net, &s);
    static struct virtio_net fresh;
    CHECK(virtio_net_init(&fresh, net_mac, &d->mem, drv_msi, d));
    CHECK(virtio_net_restore(&fresh, &s) && fresh.fd == -1);
    struct virtio_net_state again;
    virtio_net_save(&fresh, &again);
    CHECK(memcmp(&s, &again, sizeof s) == 0);
    struct virtio_net_state bad = s;
    bad.mac[5] ^= 1;
    CHECK(!virtio_net_restore(&fresh, &bad));
    bad = s;
    bad.reserved[1] = 1;
    CHECK(!virtio_net_restore(&fresh, &bad));
    bad = s;
    bad.vp.queue[NET_TX].desc = DRV_RAM_SIZE;
    CHECK(!virtio_net_restore(&fresh, &bad));
    bad = s;
    bad.vp.num_queues = 3;
    CHECK(!virtio_net_restore(&fresh, &bad));
    net_teardown(sv);
}

static void test_net(void)
{
    test_net_negotiation();
    test_net_traffic();
    test_net_rx_backpressure();
    test_net_tx_backpressure();
    test_net_hostile_tx();
    test_net_hostile_rx();
    test_net_saved_state();
}

int main(void)
{
    signal(SIGPIPE, SIG_IGN);
    ram = aligned_alloc(4096, DRV_RAM_SIZE);
    memset(ram, 0, DRV_RAM_SIZE);
    test_enumeration();
    test_handshake_and_data();
    test_backpressure();
    test_hostile_rings();
    test_hostile_registers();
    test_uart();
    test_saved_state();
    test_cmos();
    test_blk();
    test_net();
    printf("%s: %u checks, %u failed\n", failed ? "FAIL" : "PASS", checks, failed);
    free(ram);
    return failed ? 1 : 0;
}
