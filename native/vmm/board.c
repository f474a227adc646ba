/*
 * The machine a Linux guest sees around its CPU: which device answers which
 * port or address, how devices interrupt, and the host ends of their
 * channels. The devices themselves are in devices/ (plain-memory state, no
 * threads); this file wires them to KVM exits and to the control thread.
 *
 *   ports 0x3f8-0x3ff   8250 UART (ttyS0), IRQ 4 by KVM_IRQ_LINE, output to --serial-log (size-capped)
 *   ports 0xcf8-0xcff   PCI configuration mechanism #1 (bus 0: host bridge, virtio-console, with --disk
 *                       a read-only virtio-blk disk, the guest's /dev/vda, and with --net a virtio-net NIC
 *                       at the next free slot, the guest's eth0)
 *   ports 0x70-0x71     a read-only CMOS clock (devices/cmos.c), so RTC reads are sane
 *   port  0x64 / 0xcf9  keyboard-controller and PCI resets: the guest asks to reboot
 *   MMIO  0xe0000000+   PCI BARs (virtio-pci modern registers, MSI-X table)
 *   MSI-X               KVM_SIGNAL_MSI to the in-kernel LAPIC
 *   every other port    reads all ones, writes are dropped (nothing there, as on a PC)
 *
 * The vCPU loop reaches it through board_guest_ops.
 *
 * Threads: the vCPU thread calls board_io/board_mmio on exits, the control
 * thread moves agent-socket and network-socket data (board_poll_*). One mutex keeps them apart;
 * neither holds it while parked or forking, so a forked child starts with it
 * free and re-initialises it anyway.
 */
#include "vmm.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#define I8042_COMMAND_PORT 0x64
#define I8042_DATA_PORT 0x60
#define I8042_CMD_RESET 0xfe
#define PCI_RESET_PORT 0xcf9
#define PCI_RESET_BIT 0x04
#define UART_PORTS 8

static const struct virtio_console_port_spec agent_port_spec[] = {{.name = "org.clade.agent", .is_console = false}};

/* ---- interrupts -------------------------------------------------------- */

static void deliver_msi(void *ctx, uint64_t addr, uint32_t data) {
    struct board *b = ctx;
    struct kvm_msi msi = {.address_lo = (uint32_t)addr, .address_hi = (uint32_t)(addr >> 32), .data = data};
    /* A guest-programmed bad address is refused by KVM; nothing else to do about it. */
    (void)ioctl(b->vm->vm_fd, KVM_SIGNAL_MSI, &msi);
}

static void set_uart_irq(void *ctx, bool level) {
    struct board *b = ctx;
    struct kvm_irq_level line = {.irq = UART_COM1_IRQ, .level = level ? 1u : 0u};
    (void)ioctl(b->vm->vm_fd, KVM_IRQ_LINE, &line);
}

/* ---- the serial log -------------------------------------------------------- */

void serial_log_none(struct serial_log *log, uint64_t max_bytes) {
    *log = (struct serial_log){.fd = -1, .max_bytes = max_bytes};
}

static int open_log_file(const char *path, int extra_flags) {
    return open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC | O_NONBLOCK | extra_flags, 0600);
}

int serial_log_open(struct serial_log *log, const char *path, uint64_t max_bytes) {
    serial_log_none(log, max_bytes);
    if (strlen(path) + 3 > sizeof log->path) return errno = ENAMETOOLONG, -1; /* room for the rotated name, PATH.1 */
    int fd = open_log_file(path, 0);
    struct stat st;
    if (fd < 0) return -1;
    if (fstat(fd, &st) < 0) return close(fd), -1;
    snprintf(log->path, sizeof log->path, "%s", path);
    log->fd = fd;
    log->bytes = (uint64_t)st.st_size; /* an existing log counts: appending must not take it past the cap */
    return 0;
}

/*
 * At the cap: PATH becomes PATH.1 (replacing the previous one), and writing
 * goes on in a new, empty PATH. If a new file cannot be made, the current one
 * is emptied instead: the cap holds either way.
 */
static void serial_log_rotate(struct serial_log *log) {
    char old[SERIAL_LOG_PATH_MAX + 2];
    snprintf(old, sizeof old, "%s.1", log->path);
    int fd = rename(log->path, old) == 0 ? open_log_file(log->path, O_TRUNC) : -1;
    if (fd >= 0) {
        close(log->fd);
        log->fd = fd;
    } else if (ftruncate(log->fd, 0) < 0) {
        close(log->fd); /* cannot keep it under the cap: stop logging rather than grow */
        log->fd = -1;
    }
    log->bytes = 0;
}

/* One byte from the UART (vCPU thread, board lock held). A full or broken log loses the byte, like a cable nobody reads. */
void serial_log_write(struct serial_log *log, uint8_t byte) {
    if (log->fd < 0) return;
    if (log->bytes >= log->max_bytes) serial_log_rotate(log);
    if (log->fd < 0) return;
    ssize_t n;
    do n = write(log->fd, &byte, 1);
    while (n < 0 && errno == EINTR);
    if (n == 1) log->bytes++;
}

static void uart_to_log(void *ctx, uint8_t byte) {
    struct board *b = ctx;
    serial_log_write(&b->serial, byte);
}

/* ---- set-up -------------------------------------------------------------- */

/* ---- the disk ------------------------------------------------------------ */

#define DISK_ID "clade-root" /* the guest sees it as the disk's serial */

int board_disk_open(struct board_disk *disk, const char *path, char *err, size_t errlen) {
    memset(disk, 0, sizeof *disk); /* the path is saved zero-padded */
    disk->fd = -1;
    char *abs = realpath(path, NULL); /* a snapshot records it: it must name the same file from any directory */
    if (!abs) return snprintf(err, errlen, "cannot open disk %s: %s", path, strerror(errno)), -1;
    int r = -1;
    struct stat st;
    if (strlen(abs) >= sizeof disk->path) snprintf(err, errlen, "disk path %s is longer than %zu bytes", abs, sizeof disk->path - 1);
    else if ((disk->fd = open(abs, O_RDONLY | O_CLOEXEC)) < 0) snprintf(err, errlen, "cannot open disk %s: %s", abs, strerror(errno));
    else if (fstat(disk->fd, &st) < 0 || !S_ISREG(st.st_mode)) snprintf(err, errlen, "disk %s is not a regular file", abs);
    else if ((uint64_t)st.st_size < VBLK_SECTOR_SIZE || (uint64_t)st.st_size > VBLK_MAX_BYTES)
        snprintf(err, errlen, "disk %s has %lld bytes: a disk holds 512 bytes to 1 TiB", abs, (long long)st.st_size);
    else {
        disk->bytes = (uint64_t)st.st_size;
        snprintf(disk->path, sizeof disk->path, "%s", abs);
        r = 0;
    }
    if (r < 0 && disk->fd >= 0) close(disk->fd), disk->fd = -1;
    free(abs);
    return r;
}

/* ---- the network ----------------------------------------------------------- */

int board_net_connect(struct board_net *net, const char *path, char *err, size_t errlen) {
    *net = (struct board_net){.present = true, .fd = -1};
    if (path[0] != '/') return snprintf(err, errlen, "--net %s: give the network socket's absolute path", path), -1;
    if (strlen(path) >= sizeof net->path) return snprintf(err, errlen, "--net %s: longer than %zu bytes", path, sizeof net->path - 1), -1;
    net->fd = unix_connect(path);
    if (net->fd < 0)
        return snprintf(err, errlen, "cannot connect to the network socket %s: %s (is the sandbox's network process running?)", path,
                        strerror(errno)),
               -1;
    snprintf(net->path, sizeof net->path, "%s", path);
    return 0;
}

static const uint8_t nic_mac[6] = BOARD_NET_MAC;

int board_init(struct board *b, struct vm *vm, const struct serial_log *serial, int agent_listen_fd, const char *agent_path,
               const struct board_disk *disk, const struct board_net *net) {
    memset(b, 0, sizeof *b);
    b->vm = vm;
    b->disk.fd = -1;
    b->net.fd = -1;
    if (disk && disk->fd >= 0) b->disk = *disk;
    if (net && net->present) b->net = *net;
    b->serial = *serial;
    b->agent_listen_fd = agent_listen_fd;
    b->agent_fd = -1;
    b->wake_fd = -1;
    snprintf(b->agent_path, sizeof b->agent_path, "%s", agent_path ? agent_path : "");
    if (pthread_mutex_init(&b->lock, NULL) != 0) return -1;
    b->wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (b->wake_fd < 0) return -1;
    if (!guest_mem_add(&b->mem, 0, vm->ram_size, vm->ram)) return errno = EINVAL, -1;
    pci_bus_init(&b->pci, BOARD_PCI_MMIO_BASE, BOARD_PCI_MMIO_SIZE);
    uart_init(&b->uart, UART_COM1_BASE, -1, set_uart_irq, b);
    uart_set_output(&b->uart, uart_to_log, b);
    cmos_init(&b->cmos);
    if (!virtio_console_init(&b->con, agent_port_spec, 1, &b->mem, deliver_msi, b)) return errno = EINVAL, -1;
    if (pci_bus_add(&b->pci, &b->con.vp.pci) < 0) return errno = ENOSPC, -1;
    if (b->disk.fd >= 0) {
        if (!virtio_blk_init(&b->blk, b->disk.fd, b->disk.bytes, DISK_ID, &b->mem, deliver_msi, b)) return errno = EINVAL, -1;
        if (pci_bus_add(&b->pci, &b->blk.vp.pci) < 0) return errno = ENOSPC, -1;
    }
    if (!b->net.present) return 0;
    if (!virtio_net_init(&b->nic, nic_mac, &b->mem, deliver_msi, b)) return errno = EINVAL, -1;
    if (pci_bus_add(&b->pci, &b->nic.vp.pci) < 0) return errno = ENOSPC, -1;
    if (b->net.fd >= 0) virtio_net_set_fd(&b->nic, b->net.fd);
    return 0;
}

void board_destroy(struct board *b) {
    int hungup_net = b->net.present ? virtio_net_take_hungup_fd(&b->nic) : -1;
    const int fds[] = {b->serial.fd, b->agent_listen_fd, b->agent_fd, b->wake_fd, b->disk.fd, b->net.fd, hungup_net};
    for (size_t i = 0; i < sizeof fds / sizeof fds[0]; i++)
        if (fds[i] >= 0 && (i < 6 || fds[i] != b->net.fd)) close(fds[i]);
    b->serial.fd = b->agent_listen_fd = b->agent_fd = b->wake_fd = b->disk.fd = b->net.fd = -1;
    pthread_mutex_destroy(&b->lock);
}

/* ---- waking the control thread ------------------------------------------------ */

#define AGENT_HUNGUP 0x10000u /* the device let go of a descriptor: the control thread closes it, accepts the next */

/* Under b->lock: what the control thread has to wait for on the agent port now. */
static unsigned agent_wants(const struct board *b) {
    unsigned ev = b->agent_fd >= 0 ? (unsigned)(uint16_t)virtio_console_port_poll_events(&b->con, BOARD_AGENT_PORT) : 0;
    return ev | (b->con.port[BOARD_AGENT_PORT].hungup_fd >= 0 ? AGENT_HUNGUP : 0);
}

/*
 * Under b->lock, after device code ran on an exit. Compared with what the
 * control thread is polling for (recorded by board_poll_fill), not with the
 * state before the exit: "before" is partly guest memory (available ring
 * entries), which the guest changes without exiting, so a before/after
 * comparison can see no change while the control thread still waits on a
 * stale poll set, and the agent socket then goes unread for ever.
 */
/* Under b->lock: the same for the network socket. */
static unsigned net_wants(const struct board *b) {
    if (!b->net.present) return 0;
    unsigned ev = b->net.fd >= 0 ? (unsigned)(uint16_t)virtio_net_poll_events(&b->nic) : 0;
    return ev | (b->nic.hungup_fd >= 0 ? AGENT_HUNGUP : 0);
}

static bool control_thread_is_behind(const struct board *b) {
    return agent_wants(b) != b->agent_polled || net_wants(b) != b->net_polled;
}

static void wake_control_thread(struct board *b) {
    uint64_t one = 1;
    if (write(b->wake_fd, &one, sizeof one) < 0) { /* counter full: a wakeup is pending anyway */
    }
}

/* ---- port I/O ------------------------------------------------------------ */

static bool is_reset_request(uint16_t port, bool is_write, const uint8_t *data, unsigned size) {
    if (!is_write || size != 1) return false;
    if (port == I8042_COMMAND_PORT) return data[0] == I8042_CMD_RESET;
    return port == PCI_RESET_PORT && (data[0] & PCI_RESET_BIT);
}

/* An absent keyboard controller that still takes reset commands. */
static bool legacy_io(uint16_t port, bool is_write, uint8_t *data, unsigned size) {
    /* Output-buffer-full with no input pending: Linux's i8042 flush gives up at once ("no controller"),
       and its reboot path sees the input buffer empty and writes the reset command straight away. */
    if (port == I8042_COMMAND_PORT && !is_write) return memset(data, 0x01, size), true;
    return false;
}

enum guest_exit_result board_io(struct board *b, uint16_t port, bool is_write, uint8_t *data, unsigned size) {
    if (is_reset_request(port, is_write, data, size)) return GUEST_EXIT_RESET;
    pthread_mutex_lock(&b->lock);
    bool handled = (port >= UART_COM1_BASE && port < UART_COM1_BASE + UART_PORTS && uart_io(&b->uart, port, is_write, data, size)) ||
                   (port == PCI_RESET_PORT && size == 1) || /* the reset control register, not config data */
                   pci_io(&b->pci, port, is_write, data, size) || cmos_io(&b->cmos, port, is_write, data, size) ||
                   legacy_io(port, is_write, data, size);
    bool wake = control_thread_is_behind(b); /* config space reaches the virtio registers too (PCI_CFG capability) */
    pthread_mutex_unlock(&b->lock);
    if (!handled && !is_write) memset(data, 0xff, size);
    if (wake) wake_control_thread(b);
    return GUEST_EXIT_DONE;
}

/* ---- MMIO ---------------------------------------------------------------- */

void board_mmio(struct board *b, uint64_t gpa, bool is_write, uint8_t *data, unsigned len) {
    pthread_mutex_lock(&b->lock);
    bool claimed = pci_mmio(&b->pci, gpa, is_write, data, len);
    bool wake = control_thread_is_behind(b);
    pthread_mutex_unlock(&b->lock);
    if (!claimed && !is_write) memset(data, 0xff, len);
    if (wake) wake_control_thread(b);
}

/* ---- the agent socket (control thread) ------------------------------------ */

int board_poll_fill(struct board *b, struct pollfd *pfd) {
    int n = 0;
    pfd[n++] = (struct pollfd){.fd = b->wake_fd, .events = POLLIN};
    /* One host end at a time, as a socket chardev: further clients wait in the backlog. */
    if (b->agent_fd < 0 && b->agent_listen_fd >= 0) pfd[n++] = (struct pollfd){.fd = b->agent_listen_fd, .events = POLLIN};
    pthread_mutex_lock(&b->lock);
    b->agent_polled = agent_wants(b); /* from now on the vCPU thread wakes us when this goes stale */
    b->net_polled = net_wants(b);
    short ev = (short)(b->agent_polled & 0xffffu), net_ev = (short)(b->net_polled & 0xffffu);
    pthread_mutex_unlock(&b->lock);
    /* With no interest, leave it out: a hung-up peer would poll as POLLHUP for ever; EOF is seen when the guest reads. */
    if (ev) pfd[n++] = (struct pollfd){.fd = b->agent_fd, .events = ev};
    if (net_ev) pfd[n++] = (struct pollfd){.fd = b->net.fd, .events = net_ev};
    return n;
}

static void accept_agent_client(struct board *b) {
    int fd = accept4(b->agent_listen_fd, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK);
    if (fd < 0) return;
    pthread_mutex_lock(&b->lock);
    b->agent_fd = fd;
    b->agent_connects++;
    virtio_console_port_set_fd(&b->con, BOARD_AGENT_PORT, fd);
    pthread_mutex_unlock(&b->lock);
}

/* The device let go of a descriptor after EOF or a write error: close it, accept the next client. */
static void reap_hungup_agent(struct board *b) {
    pthread_mutex_lock(&b->lock);
    int fd = virtio_console_port_take_hungup_fd(&b->con, BOARD_AGENT_PORT);
    if (fd >= 0 && fd == b->agent_fd) b->agent_fd = -1;
    pthread_mutex_unlock(&b->lock);
    if (fd >= 0) close(fd);
}

/* The device dropped its network connection (the network process went away, or broke the framing): close it, say why.
   The guest's link stays up; its frames are dropped until a restart gives the VM a network again. */
static void reap_hungup_net(struct board *b) {
    if (!b->net.present) return;
    pthread_mutex_lock(&b->lock);
    int fd = virtio_net_take_hungup_fd(&b->nic);
    const char *why = b->nic.hangup_reason;
    if (fd >= 0 && fd == b->net.fd) b->net.fd = -1;
    pthread_mutex_unlock(&b->lock);
    if (fd < 0) return;
    close(fd);
    fprintf(stderr, "clade-vmm: network %s disconnected: %s\n", b->net.path, why ? why : "?");
}

void board_poll_handle(struct board *b, const struct pollfd *pfd, int n) {
    for (int i = 0; i < n; i++) {
        if (!pfd[i].revents) continue;
        if (pfd[i].fd == b->wake_fd) {
            uint64_t drained;
            if (read(b->wake_fd, &drained, sizeof drained) < 0) { /* raced with another drain */
            }
        } else if (pfd[i].fd == b->agent_listen_fd) {
            accept_agent_client(b);
        } else if (pfd[i].fd == b->agent_fd) {
            pthread_mutex_lock(&b->lock);
            virtio_console_port_io(&b->con, BOARD_AGENT_PORT);
            pthread_mutex_unlock(&b->lock);
        } else if (b->net.present && pfd[i].fd == b->net.fd) {
            pthread_mutex_lock(&b->lock);
            virtio_net_io(&b->nic);
            pthread_mutex_unlock(&b->lock);
        }
    }
    reap_hungup_agent(b);
    reap_hungup_net(b);
}

/* ---- fork ------------------------------------------------------------------ */

/*
 * In a forked child, before its vCPU runs: the devices' state is the
 * parent's (copied by fork); only host descriptors change. The parent's agent
 * connection is not ours: the guest sees the host end close, and open again
 * when a client connects to the child's own agent socket. Interrupts that
 * were in flight are raised again on the new VM's irqchip.
 */
void board_child_rebind(struct board *b, int agent_listen_fd, const char *agent_path, const struct serial_log *serial,
                        int net_fd, const char *net_path, struct board_stale *stale) {
    *stale = (struct board_stale){.agent_fd = b->agent_fd, .agent_listen_fd = b->agent_listen_fd, .wake_fd = b->wake_fd,
                                  .serial_fd = b->serial.fd, .net_fd = b->net.fd, .net_hungup_fd = -1};
    pthread_mutex_init(&b->lock, NULL);
    b->wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    b->agent_listen_fd = agent_listen_fd;
    b->agent_fd = -1;
    b->agent_polled = 0;
    b->agent_connects = 0;
    snprintf(b->agent_path, sizeof b->agent_path, "%s", agent_path);
    b->serial = *serial; /* the parent's log is the parent's: a child writes only its own */
    virtio_console_port_discard_output(&b->con, BOARD_AGENT_PORT); /* the parent's half-sent bytes are the parent's */
    virtio_console_port_set_fd(&b->con, BOARD_AGENT_PORT, -1);
    stale->hungup_fd = virtio_console_port_take_hungup_fd(&b->con, BOARD_AGENT_PORT);
    if (!b->net.present) return;
    /* The child's own network: the parent's connection, and any frame half-way along it, stay the parent's. */
    stale->net_hungup_fd = virtio_net_take_hungup_fd(&b->nic);
    b->net.fd = net_fd;
    b->net_polled = 0;
    snprintf(b->net.path, sizeof b->net.path, "%s", net_path);
    virtio_net_set_fd(&b->nic, net_fd);
}

void board_close_stale(const struct board_stale *stale) {
    const int fds[] = {stale->agent_fd, stale->agent_listen_fd, stale->wake_fd, stale->serial_fd, stale->hungup_fd};
    for (size_t i = 0; i < sizeof fds / sizeof fds[0]; i++)
        if (fds[i] >= 0 && (i == 0 || fds[i] != fds[0])) close(fds[i]);
    if (stale->net_fd >= 0) close(stale->net_fd);
    if (stale->net_hungup_fd >= 0 && stale->net_hungup_fd != stale->net_fd) close(stale->net_hungup_fd);
}

/* ---- snapshots -------------------------------------------------------------- */

_Static_assert(sizeof(struct board_disk_state) == 16 + BOARD_DISK_PATH_MAX + sizeof(struct virtio_blk_state),
               "no implicit padding in saved state");
_Static_assert(sizeof(struct board_net_state) == 8 + sizeof(struct virtio_net_state), "no implicit padding in saved state");
_Static_assert(sizeof(struct board_state) == sizeof(struct pci_bus_state) + sizeof(struct virtio_console_state) +
                                                 sizeof(struct uart_state) + sizeof(struct cmos_state) + sizeof(struct board_disk_state) +
                                                 sizeof(struct board_net_state),
               "no implicit padding in saved state");

void board_save(const struct board *b, struct board_state *s) {
    memset(s, 0, sizeof *s);
    pci_bus_save(&b->pci, &s->pci);
    virtio_console_save(&b->con, &s->con);
    uart_save(&b->uart, &s->uart);
    cmos_save(&b->cmos, &s->cmos);
    if (b->disk.fd >= 0) {
        s->disk.present = 1;
        s->disk.bytes = b->disk.bytes;
        memcpy(s->disk.path, b->disk.path, sizeof s->disk.path); /* zero-padded by board_disk_open */
        virtio_blk_save(&b->blk, &s->disk.blk);
    }
    if (b->net.present) {
        s->net.present = 1;
        virtio_net_save(&b->nic, &s->net.nic);
    }
}

/* The saved disk part against the disk this board was set up with (the path the snapshot named, opened again). */
static bool disk_restore(struct board *b, const struct board_disk_state *s) {
    static const struct board_disk_state none;
    if (s->present > 1 || s->reserved) return false;
    if (!s->present) return b->disk.fd < 0 && memcmp(s, &none, sizeof none) == 0;
    if (b->disk.fd < 0 || s->bytes != b->disk.bytes || memchr(s->path, 0, sizeof s->path) == NULL ||
        strcmp(s->path, b->disk.path) != 0)
        return false;
    for (size_t i = strlen(s->path); i < sizeof s->path; i++)
        if (s->path[i]) return false;
    return virtio_blk_restore(&b->blk, &s->blk);
}

/* The saved network part against this board: a NIC exactly when the snapshot had one. */
static bool net_restore(struct board *b, const struct board_net_state *s) {
    static const struct board_net_state none;
    if (s->present > 1 || s->reserved) return false;
    if (!s->present) return !b->net.present && memcmp(s, &none, sizeof none) == 0;
    return b->net.present && virtio_net_restore(&b->nic, &s->nic);
}

/*
 * Each device checks its own part against itself as board_init just built
 * it: this process's RAM, callbacks and descriptors stay as they are, only
 * plain values come in. Then the guest is told its agent port's host end
 * closed (as in a forked child; it opens when a client connects), and
 * interrupts that may have been in flight are raised again.
 */
int board_restore(struct board *b, const struct board_state *s) {
    if (!cmos_restore(&b->cmos, &s->cmos) || !pci_bus_restore(&b->pci, &s->pci) || !virtio_console_restore(&b->con, &s->con) ||
        !uart_restore(&b->uart, &s->uart) || !disk_restore(b, &s->disk) || !net_restore(b, &s->net))
        return errno = EINVAL, -1;
    virtio_console_port_set_fd(&b->con, BOARD_AGENT_PORT, -1); /* flushes the PORT_OPEN 0 the restore queued */
    virtio_pci_resignal(&b->con.vp);
    if (b->disk.fd >= 0) virtio_pci_resignal(&b->blk.vp);
    if (b->net.present) {
        virtio_net_set_fd(&b->nic, b->net.fd); /* the restore left it disconnected: this run's connection */
        virtio_pci_resignal(&b->nic.vp);
    }
    uart_resync_irq(&b->uart);
    return 0;
}

/* ---- as the vCPU loop sees it ------------------------------------------------- */

static enum guest_exit_result board_op_io(void *guest, uint16_t port, bool is_write, uint8_t *data, unsigned size) {
    return board_io(guest, port, is_write, data, size);
}

static enum guest_exit_result board_op_mmio(void *guest, uint64_t gpa, bool is_write, uint8_t *data, unsigned len) {
    board_mmio(guest, gpa, is_write, data, len);
    return GUEST_EXIT_DONE;
}

/* An MSI raised just before the fork may only have reached the parent's irqchip: raise every enabled one again. */
static void board_op_forked(void *guest) {
    struct board *b = guest;
    virtio_pci_resignal(&b->con.vp);
    if (b->disk.fd >= 0) virtio_pci_resignal(&b->blk.vp);
    if (b->net.present) virtio_pci_resignal(&b->nic.vp);
    uart_resync_irq(&b->uart);
}

static void board_op_status(void *guest, struct text_buf *out) {
    struct board *b = guest;
    tb_printf(out, ",\"agentSocket\":");
    tb_json_string(out, b->agent_path);
    tb_printf(out, ",\"agentConnected\":%s,\"serialLogBytes\":%" PRIu64, b->agent_fd >= 0 ? "true" : "false", b->serial.bytes);
    if (b->disk.fd >= 0) {
        tb_printf(out, ",\"disk\":");
        tb_json_string(out, b->disk.path);
        tb_printf(out, ",\"diskReads\":%" PRIu64 ",\"diskErrors\":%" PRIu64, b->blk.reads, b->blk.errors);
    }
    if (!b->net.present) return;
    tb_printf(out, ",\"net\":");
    tb_json_string(out, b->net.path);
    tb_printf(out, ",\"netConnected\":%s,\"netTxFrames\":%" PRIu64 ",\"netRxFrames\":%" PRIu64 ",\"netTxDropped\":%" PRIu64
                   ",\"netRxDropped\":%" PRIu64,
              b->net.fd >= 0 ? "true" : "false", b->nic.tx_frames, b->nic.rx_frames, b->nic.tx_dropped, b->nic.rx_dropped);
}

const struct guest_ops board_guest_ops = {
    .name = "linux", .io = board_op_io, .mmio = board_op_mmio, .forked = board_op_forked, .status = board_op_status};
