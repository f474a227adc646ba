#include "virtio_console.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/virtio_console.h>
#include <poll.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define VIRTIO_ID_CONSOLE 3
#define PCI_CLASS_COMM_OTHER 0x078000
#define CTRL_RX_QUEUE 2 /* device -> driver control messages */
#define CTRL_TX_QUEUE 3 /* driver -> device control messages */
#define CTRL_MSG_SIZE 8 /* le32 id, le16 event, le16 value */
#define CONFIG_SIZE 12  /* cols, rows, max_nr_ports, emerg_wr */

static struct virtio_console *to_con(struct virtio_pci *vp) { return (struct virtio_console *)vp; }

/* Port 0 keeps the first queue pair; the control queues sit between it and
 * port 1 (virtio 1.x, 5.3.2). */
static unsigned rx_queue(unsigned id) { return id == 0 ? 0 : 2 * (id + 1); }
static unsigned tx_queue(unsigned id) { return rx_queue(id) + 1; }

/* ---- copying between chains and flat buffers ------------------------- */

/* Copies up to max bytes of the chain's readable part starting at skip. */
static size_t chain_read(const struct virtq_chain *c, uint64_t skip, uint8_t *dst, size_t max)
{
    size_t done = 0;
    for (unsigned i = 0; i < c->n_out && done < max; i++) {
        size_t len = c->seg[i].iov_len;
        if (skip >= len) {
            skip -= len;
            continue;
        }
        size_t n = len - skip < max - done ? len - skip : max - done;
        memcpy(dst + done, (uint8_t *)c->seg[i].iov_base + skip, n);
        done += n;
        skip = 0;
    }
    return done;
}

/* Fills the chain's writable part with up to len bytes; returns bytes written. */
static size_t chain_write(const struct virtq_chain *c, const uint8_t *src, size_t len)
{
    size_t done = 0;
    for (unsigned i = c->n_out; i < c->n_out + c->n_in && done < len; i++) {
        size_t n = c->seg[i].iov_len < len - done ? c->seg[i].iov_len : len - done;
        memcpy(c->seg[i].iov_base, src + done, n);
        done += n;
    }
    return done;
}

/* A pop that turns a hostile ring into DEVICE_NEEDS_RESET. */
static int pop(struct virtio_console *con, unsigned q, struct virtq_chain *c)
{
    int r = virtq_pop(virtio_pci_vq(&con->vp, q), c);
    if (r < 0)
        virtio_pci_needs_reset(&con->vp);
    return r;
}

/* ---- control queue: device -> driver --------------------------------- */

static void push_open(struct vcon_port *p, uint8_t value)
{
    int last = p->owe_open_count ? p->owe_open[p->owe_open_count - 1] : p->sent_open;
    if (last == value)
        return;
    if (p->owe_open_count == 2)
        p->owe_open_count = 1; /* x, y, x: the guest only needs the final x */
    else
        p->owe_open[p->owe_open_count++] = value;
}

/* The next message port p owes, built into msg; 0 if none. */
static size_t next_message(struct vcon_port *p, unsigned id, uint8_t *msg, bool take)
{
    uint16_t event, value = 1;
    size_t extra = 0;
    if (p->owe_add)
        event = VIRTIO_CONSOLE_PORT_ADD;
    else if (p->owe_console)
        event = VIRTIO_CONSOLE_CONSOLE_PORT;
    else if (p->owe_name) {
        event = VIRTIO_CONSOLE_PORT_NAME;
        extra = strlen(p->name);
        memcpy(msg + CTRL_MSG_SIZE, p->name, extra);
    } else if (p->owe_open_count) {
        event = VIRTIO_CONSOLE_PORT_OPEN;
        value = p->owe_open[0];
    } else
        return 0;
    pci_put_le(msg, 4, id);
    pci_put_le(msg + 4, 2, event);
    pci_put_le(msg + 6, 2, value);
    if (!take)
        return CTRL_MSG_SIZE + extra;
    if (p->owe_add)
        p->owe_add = false;
    else if (p->owe_console) {
        p->owe_console = false;
        p->guest_open = true; /* the guest's console is open from the start */
    } else if (p->owe_name)
        p->owe_name = false;
    else {
        p->sent_open = p->owe_open[0];
        p->owe_open[0] = p->owe_open[1];
        p->owe_open_count--;
    }
    return CTRL_MSG_SIZE + extra;
}

/* Sends owed control messages while the driver has receive buffers posted. */
static void flush_control(struct virtio_console *con)
{
    if (!con->device_ready || !virtio_pci_queue_live(&con->vp, CTRL_RX_QUEUE))
        return;
    uint8_t msg[CTRL_MSG_SIZE + VCON_NAME_MAX];
    bool used = false;
    for (unsigned id = 0; id < con->nr_ports; id++) {
        struct vcon_port *p = &con->port[id];
        while (next_message(p, id, msg, false)) {
            if (pop(con, CTRL_RX_QUEUE, &con->scratch) <= 0)
                goto done;
            size_t len = next_message(p, id, msg, true);
            virtq_push(virtio_pci_vq(&con->vp, CTRL_RX_QUEUE), con->scratch.head,
                       (uint32_t)chain_write(&con->scratch, msg, len));
            used = true;
        }
    }
done:
    if (used)
        virtio_pci_queue_used(&con->vp, CTRL_RX_QUEUE);
}

/* ---- port data -------------------------------------------------------- */

static void detach(struct virtio_console *con, struct vcon_port *p)
{
    if (p->fd < 0)
        return;
    p->hungup_fd = p->fd;
    p->fd = -1;
    p->out_len = p->out_start = 0; /* nobody left to read it */
    if (p->guest_ready)
        push_open(p, 0);
    flush_control(con);
}

static ssize_t write_fd(int fd, const void *buf, size_t len)
{
    /* send() with MSG_NOSIGNAL keeps a vanished peer from killing the VMM
     * with SIGPIPE; pipes fall back to write(). */
    ssize_t n = send(fd, buf, len, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (n < 0 && errno == ENOTSOCK)
        n = write(fd, buf, len);
    return n;
}

/* Writes buffered guest output to the host end; false if it is still blocked. */
static bool flush_out(struct virtio_console *con, struct vcon_port *p)
{
    while (p->out_len > 0 && p->fd >= 0) {
        ssize_t n = write_fd(p->fd, p->out + p->out_start, p->out_len);
        if (n > 0) {
            p->out_start += (size_t)n;
            p->out_len -= (size_t)n;
        } else if (n < 0 && errno == EINTR) {
            continue;
        } else if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            return false;
        } else {
            detach(con, p);
        }
    }
    if (p->out_len == 0 || p->fd < 0)
        p->out_start = p->out_len = 0; /* no host end: output is dropped */
    return true;
}

/* Room at the end of the output buffer, compacting it first if that helps. */
static size_t out_room(struct vcon_port *p)
{
    if (p->out_start > 0 && p->out_start + p->out_len == VCON_OUT_BUF_SIZE) {
        memmove(p->out, p->out + p->out_start, p->out_len);
        p->out_start = 0;
    }
    return VCON_OUT_BUF_SIZE - p->out_start - p->out_len;
}

/* Copies as much of the current chain as fits; 1 when it is all copied, 0
 * when some is left, -1 when nothing could be copied (buffer full). */
static int copy_chain_out(struct vcon_port *p)
{
    uint64_t left = p->tx_chain.out_bytes - p->tx_done;
    size_t room = out_room(p);
    size_t n = chain_read(&p->tx_chain, p->tx_done, p->out + p->out_start + p->out_len, left < room ? left : room);
    p->out_len += n;
    p->tx_done += n;
    if (p->tx_done == p->tx_chain.out_bytes)
        return 1;
    return n ? 0 : -1;
}

static void pump_tx(struct virtio_console *con, unsigned id)
{
    struct vcon_port *p = &con->port[id];
    unsigned q = tx_queue(id);
    bool used = false;
    while (virtio_pci_queue_live(&con->vp, q)) {
        if (!flush_out(con, p) && out_room(p) == 0) {
            if (!p->is_console)
                break; /* backpressure: the guest's buffers wait in the ring */
            p->out_start = p->out_len = 0;
        }
        if (!p->tx_active) {
            if (pop(con, q, &p->tx_chain) <= 0)
                break;
            p->tx_active = true;
            p->tx_done = 0;
        }
        int copied = copy_chain_out(p);
        if (copied < 0 && !p->is_console)
            break; /* cannot happen after a flush made room; never spin */
        if (copied <= 0)
            continue; /* buffer full: flush and retry */
        virtq_push(virtio_pci_vq(&con->vp, q), p->tx_chain.head, 0);
        p->tx_active = false;
        used = true;
    }
    flush_out(con, p);
    if (used)
        virtio_pci_queue_used(&con->vp, q);
}

static void pump_rx(struct virtio_console *con, unsigned id)
{
    struct vcon_port *p = &con->port[id];
    unsigned q = rx_queue(id);
    bool used = false;
    while (p->fd >= 0 && p->guest_open && virtio_pci_queue_live(&con->vp, q)) {
        struct virtq_chain *c = &con->scratch;
        if (pop(con, q, c) <= 0)
            break;
        if (c->n_in == 0) {
            virtq_push(virtio_pci_vq(&con->vp, q), c->head, 0); /* nothing to fill */
            used = true;
            continue;
        }
        ssize_t n;
        do
            n = readv(p->fd, &c->seg[c->n_out], (int)c->n_in);
        while (n < 0 && errno == EINTR);
        if (n <= 0) {
            virtq_unpop(virtio_pci_vq(&con->vp, q));
            if (n == 0 || (errno != EAGAIN && errno != EWOULDBLOCK))
                detach(con, p); /* EOF or a broken descriptor: the host end is gone */
            break;
        }
        virtq_push(virtio_pci_vq(&con->vp, q), c->head, (uint32_t)n);
        used = true;
    }
    if (used)
        virtio_pci_queue_used(&con->vp, q);
}

/* ---- control queue: driver -> device --------------------------------- */

static void port_ready(struct virtio_console *con, struct vcon_port *p)
{
    (void)con;
    p->guest_ready = true;
    p->owe_console = p->is_console;
    p->owe_name = p->name[0] != 0;
    if (p->fd >= 0)
        push_open(p, 1);
}

static void handle_control(struct virtio_console *con, const uint8_t *msg)
{
    uint32_t id = pci_get_le(msg, 4);
    uint16_t event = (uint16_t)pci_get_le(msg + 4, 2), value = (uint16_t)pci_get_le(msg + 6, 2);
    if (event == VIRTIO_CONSOLE_DEVICE_READY) {
        if (value != 1 || con->device_ready)
            return;
        con->device_ready = true;
        for (unsigned i = 0; i < con->nr_ports; i++)
            con->port[i].owe_add = true;
        return;
    }
    if (id >= con->nr_ports)
        return; /* a port we never offered */
    struct vcon_port *p = &con->port[id];
    if (event == VIRTIO_CONSOLE_PORT_READY && value == 1 && !p->guest_ready)
        port_ready(con, p);
    else if (event == VIRTIO_CONSOLE_PORT_OPEN && p->guest_ready)
        p->guest_open = value != 0;
}

static void process_control(struct virtio_console *con)
{
    struct virtq *vq = virtio_pci_vq(&con->vp, CTRL_TX_QUEUE);
    bool used = false;
    while (virtio_pci_queue_live(&con->vp, CTRL_TX_QUEUE) && pop(con, CTRL_TX_QUEUE, &con->scratch) > 0) {
        uint8_t msg[CTRL_MSG_SIZE];
        if (chain_read(&con->scratch, 0, msg, sizeof msg) == sizeof msg)
            handle_control(con, msg); /* short messages are dropped */
        virtq_push(vq, con->scratch.head, 0);
        used = true;
    }
    /* The driver busy-waits for its control buffer to come back. */
    if (used)
        virtio_pci_queue_used(&con->vp, CTRL_TX_QUEUE);
    flush_control(con);
    for (unsigned i = 0; i < con->nr_ports; i++)
        pump_rx(con, i); /* a port may just have been opened */
}

/* ---- transport hooks -------------------------------------------------- */

static void queue_notify(struct virtio_pci *vp, unsigned q)
{
    struct virtio_console *con = to_con(vp);
    if (q == CTRL_TX_QUEUE)
        process_control(con);
    else if (q == CTRL_RX_QUEUE)
        flush_control(con);
    else {
        unsigned id = q < 2 ? 0 : q / 2 - 1;
        if (id >= con->nr_ports)
            return;
        if (q & 1)
            pump_tx(con, id);
        else
            pump_rx(con, id);
    }
}

static void config_access(struct virtio_pci *vp, uint64_t off, bool is_write, uint8_t *data, unsigned len)
{
    if (is_write)
        return; /* no emergency write offered: the whole block is read-only */
    uint8_t cfg[CONFIG_SIZE] = {0}; /* cols and rows 0: no size offered */
    pci_put_le(cfg + 4, 4, to_con(vp)->nr_ports);
    for (unsigned i = 0; i < len; i++)
        data[i] = off + i < CONFIG_SIZE ? cfg[off + i] : 0;
}

static void device_reset(struct virtio_pci *vp)
{
    struct virtio_console *con = to_con(vp);
    con->device_ready = false;
    for (unsigned i = 0; i < con->nr_ports; i++) {
        struct vcon_port *p = &con->port[i];
        p->guest_ready = p->guest_open = false;
        p->owe_add = p->owe_console = p->owe_name = false;
        p->owe_open_count = 0;
        p->sent_open = -1;
        p->tx_active = false; /* its chain belonged to the old rings */
    }
}

static void driver_ok(struct virtio_pci *vp)
{
    struct virtio_console *con = to_con(vp);
    for (unsigned q = 0; q < vp->num_queues; q++)
        if (virtio_pci_queue_live(vp, q))
            queue_notify(vp, q); /* buffers posted before DRIVER_OK */
    flush_control(con);
}

static const struct virtio_device_ops console_ops = {
    .reset = device_reset,
    .queue_notify = queue_notify,
    .config_access = config_access,
    .driver_ok = driver_ok,
};

/* ---- public API ------------------------------------------------------- */

bool virtio_console_init(struct virtio_console *con, const struct virtio_console_port_spec *ports, unsigned nr_ports,
                         const struct guest_mem *mem, virtio_msi_fn msi, void *msi_ctx)
{
    if (nr_ports == 0 || nr_ports > VCON_MAX_PORTS)
        return false;
    memset(con, 0, sizeof *con);
    con->nr_ports = nr_ports;
    for (unsigned i = 0; i < nr_ports; i++) {
        struct vcon_port *p = &con->port[i];
        if (ports[i].name && strlen(ports[i].name) > VCON_NAME_MAX)
            return false;
        if (ports[i].name)
            strcpy(p->name, ports[i].name);
        p->is_console = ports[i].is_console;
        p->fd = p->hungup_fd = -1;
        p->sent_open = -1;
    }
    struct virtio_pci_params params = {
        .virtio_id = VIRTIO_ID_CONSOLE,
        .class_code = PCI_CLASS_COMM_OTHER,
        .device_features = 1ull << VIRTIO_CONSOLE_F_MULTIPORT,
        .num_queues = (uint16_t)(2 * (nr_ports + 1)),
        .queue_max_size = VCON_QUEUE_SIZE,
    };
    return virtio_pci_init(&con->vp, &params, &console_ops, con, mem, msi, msi_ctx);
}

void virtio_console_port_set_fd(struct virtio_console *con, unsigned id, int fd)
{
    if (id >= con->nr_ports)
        return;
    struct vcon_port *p = &con->port[id];
    if (fd >= 0) {
        int fl = fcntl(fd, F_GETFL);
        if (fl >= 0 && !(fl & O_NONBLOCK))
            fcntl(fd, F_SETFL, fl | O_NONBLOCK); /* the vCPU thread must never block on it */
    }
    bool was = p->fd >= 0, now = fd >= 0;
    p->fd = fd;
    if (was != now && p->guest_ready)
        push_open(p, now);
    flush_control(con);
    virtio_console_port_io(con, id);
}

void virtio_console_port_io(struct virtio_console *con, unsigned id)
{
    if (id >= con->nr_ports)
        return;
    pump_tx(con, id);
    pump_rx(con, id);
}

short virtio_console_port_poll_events(const struct virtio_console *con, unsigned id)
{
    if (id >= con->nr_ports || con->port[id].fd < 0)
        return 0;
    const struct vcon_port *p = &con->port[id];
    short ev = 0;
    if (p->guest_open && virtio_pci_queue_live(&con->vp, rx_queue(id)) &&
        virtq_has_avail(&con->vp.queue[rx_queue(id)].vq))
        ev |= POLLIN;
    if (p->out_len > 0)
        ev |= POLLOUT;
    return ev;
}

void virtio_console_port_discard_output(struct virtio_console *con, unsigned id)
{
    if (id < con->nr_ports)
        con->port[id].out_start = con->port[id].out_len = 0;
}

int virtio_console_port_take_hungup_fd(struct virtio_console *con, unsigned id)
{
    if (id >= con->nr_ports)
        return -1;
    int fd = con->port[id].hungup_fd;
    con->port[id].hungup_fd = -1;
    return fd;
}

/* ---- saved state -------------------------------------------------------- */

_Static_assert(sizeof(struct vcon_port_state) == 16, "no implicit padding in saved state");
_Static_assert(sizeof(struct virtio_console_state) == 1272, "no implicit padding in saved state");

void virtio_console_save(const struct virtio_console *con, struct virtio_console_state *s)
{
    memset(s, 0, sizeof *s);
    virtio_pci_save(&con->vp, &s->vp);
    s->nr_ports = con->nr_ports;
    s->device_ready = con->device_ready;
    for (unsigned i = 0; i < con->nr_ports; i++) {
        const struct vcon_port *p = &con->port[i];
        struct vcon_port_state *ps = &s->port[i];
        ps->guest_ready = p->guest_ready, ps->guest_open = p->guest_open;
        ps->owe_add = p->owe_add, ps->owe_console = p->owe_console, ps->owe_name = p->owe_name;
        ps->owe_open_count = (uint8_t)p->owe_open_count;
        memcpy(ps->owe_open, p->owe_open, sizeof ps->owe_open);
        ps->sent_open = (int8_t)p->sent_open;
        /* The chain being copied out holds host pointers: give it back to the ring instead (as virtq_unpop). */
        if (p->tx_active)
            s->vp.queue[tx_queue(i)].vq.last_avail_idx--;
    }
}

static bool flag(uint8_t v) { return v <= 1; }

static bool port_state_ok(const struct vcon_port *p, const struct vcon_port_state *ps)
{
    for (unsigned i = 0; i < sizeof ps->reserved; i++)
        if (ps->reserved[i])
            return false;
    return flag(ps->guest_ready) && flag(ps->guest_open) && flag(ps->owe_add) && flag(ps->owe_console) &&
           flag(ps->owe_name) && ps->owe_open_count <= 2 && flag(ps->owe_open[0]) && flag(ps->owe_open[1]) &&
           ps->sent_open >= -1 && ps->sent_open <= 1 && (!ps->owe_console || p->is_console) && (!ps->owe_name || p->name[0]);
}

bool virtio_console_restore(struct virtio_console *con, const struct virtio_console_state *s)
{
    if (s->nr_ports != con->nr_ports || !flag(s->device_ready) || s->reserved[0] || s->reserved[1] || s->reserved[2])
        return false;
    for (unsigned i = 0; i < VCON_MAX_PORTS; i++) {
        const struct vcon_port_state *ps = &s->port[i];
        static const struct vcon_port_state unused; /* ports the device does not have are saved as zeros */
        if (i < con->nr_ports ? !port_state_ok(&con->port[i], ps) : memcmp(ps, &unused, sizeof unused) != 0)
            return false;
    }
    if (!virtio_pci_restore(&con->vp, &s->vp))
        return false;
    con->device_ready = s->device_ready;
    for (unsigned i = 0; i < con->nr_ports; i++) {
        struct vcon_port *p = &con->port[i];
        const struct vcon_port_state *ps = &s->port[i];
        p->guest_ready = ps->guest_ready, p->guest_open = ps->guest_open;
        p->owe_add = ps->owe_add, p->owe_console = ps->owe_console, p->owe_name = ps->owe_name;
        p->owe_open_count = ps->owe_open_count;
        memcpy(p->owe_open, ps->owe_open, sizeof p->owe_open);
        p->sent_open = ps->sent_open;
        p->fd = p->hungup_fd = -1;
        p->tx_active = false;
        p->tx_done = 0;
        p->out_start = p->out_len = 0;
        int told = p->owe_open_count ? p->owe_open[p->owe_open_count - 1] : p->sent_open;
        if (p->guest_ready && told == 1)
            push_open(p, 0); /* the host end the guest last heard of is gone; sent when it next posts buffers */
    }
    return true;
}
