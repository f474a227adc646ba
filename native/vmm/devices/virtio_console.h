/*
 * virtio-console (virtio id 3) with VIRTIO_CONSOLE_F_MULTIPORT, on the
 * virtio-pci transport. Each port's host end is a file descriptor the VMM
 * owns (a unix socket or a pipe; the library makes it non-blocking and never
 * closes it). The guest sees:
 *
 *   - a port named as configured (e.g. "org.clade.agent"), which appears as
 *     /dev/vportNpM with that name in /sys/class/virtio-ports/<port>/name;
 *   - optionally a console port (an hvc device).
 *
 * Host connect/disconnect (virtio_console_port_set_fd with a descriptor or
 * -1, or EOF/error on the descriptor) is told to the guest with PORT_OPEN, so
 * a guest program sees POLLHUP while the host end is closed and SIGIO when it
 * opens again.
 *
 * Guest->host bytes go through a bounded per-port buffer (64 KiB). When the
 * descriptor does not take them (EAGAIN), the device stops taking the
 * guest's buffers: backpressure, never unbounded memory. A console port drops
 * its oldest output instead, because the guest kernel busy-waits for console
 * writes. Host->guest bytes are read only while the guest has the port open
 * and has posted receive buffers.
 *
 * Threads: the library has none. All calls for one device must come from one
 * thread at a time (the vCPU thread handling exits, or the VMM's poll loop
 * under the same lock).
 *
 * fork(2): all state is plain memory inside struct virtio_console; the child
 * continues with it. In the child the VMM (1) calls
 * virtio_console_port_set_fd() for each port with the child's own descriptor
 * (or -1, then later the descriptor: the guest then sees a disconnect and a
 * reconnect, which resets its stream), optionally
 * virtio_console_port_discard_output() first so the parent's half-sent bytes
 * do not reach the child's host end, and (2) calls virtio_pci_resignal(&con->vp)
 * once its interrupt path (new VM's irqchip) is ready.
 */
#ifndef CLADE_VIRTIO_CONSOLE_H
#define CLADE_VIRTIO_CONSOLE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "virtio_pci.h"

#define VCON_MAX_PORTS 4
#define VCON_NAME_MAX 63
#define VCON_OUT_BUF_SIZE 65536
#define VCON_QUEUE_SIZE 128

struct virtio_console_port_spec {
    const char *name; /* NULL: unnamed */
    bool is_console;  /* offered to the guest as its hvc console */
};

struct vcon_port {
    char name[VCON_NAME_MAX + 1];
    bool is_console;
    int fd;        /* host end, -1 while disconnected */
    int hungup_fd; /* a descriptor that hit EOF/error, for the VMM to close */

    bool guest_ready; /* PORT_READY received */
    bool guest_open;  /* the guest has the port open */
    /* Control messages still owed to the guest, sent when it posts buffers. */
    bool owe_add, owe_console, owe_name;
    uint8_t owe_open[2];
    unsigned owe_open_count;
    int sent_open; /* last PORT_OPEN value sent, -1 none */

    /* Guest->host: the chain being copied out, and bytes not yet written. */
    bool tx_active;
    uint64_t tx_done;
    struct virtq_chain tx_chain;
    uint8_t out[VCON_OUT_BUF_SIZE];
    size_t out_start, out_len;
};

struct virtio_console {
    struct virtio_pci vp; /* first member */
    unsigned nr_ports;
    bool device_ready; /* DEVICE_READY received */
    struct vcon_port port[VCON_MAX_PORTS];
    struct virtq_chain scratch; /* for control and receive chains */
};

/*
 * Saved state (docs/vmm-devices.md, "Saved state"): plain data only, no
 * descriptors. Host ends never survive a save: a restored device starts with
 * every port disconnected, so guest output not yet written is not saved,
 * and a chain the guest was sending is given back to its ring (taken again
 * after restore, from its start; its bytes then go to the new host end or,
 * while there is none, are dropped).
 */
struct vcon_port_state {
    uint8_t guest_ready, guest_open, owe_add, owe_console, owe_name, owe_open_count;
    uint8_t owe_open[2];
    int8_t sent_open;
    uint8_t reserved[7]; /* 0 */
};

struct virtio_console_state {
    struct virtio_pci_state vp;
    uint32_t nr_ports;
    uint8_t device_ready;
    uint8_t reserved[3]; /* 0 */
    struct vcon_port_state port[VCON_MAX_PORTS];
};

void virtio_console_save(const struct virtio_console *con, struct virtio_console_state *s);
/* Loads s into a console freshly set up with the same ports; every port is
 * disconnected afterwards (its fd -1). False, con unchanged, if any value is
 * out of range or inconsistent (see virtio_pci_restore). */
bool virtio_console_restore(struct virtio_console *con, const struct virtio_console_state *s);

/* Sets up the device with nr_ports ports (ids 0..nr_ports-1), all
 * disconnected. Then pci_bus_add(bus, &con->vp.pci). */
bool virtio_console_init(struct virtio_console *con, const struct virtio_console_port_spec *ports, unsigned nr_ports,
                         const struct guest_mem *mem, virtio_msi_fn msi, void *msi_ctx);

/* Connects port id to fd (>= 0) or disconnects it (-1). The previous
 * descriptor is not closed. Tells the guest when the connected state changes
 * and moves any data that can move. */
void virtio_console_port_set_fd(struct virtio_console *con, unsigned id, int fd);

/* Moves data both ways on port id: call when its descriptor polls readable
 * or writable (see virtio_console_port_poll_events). */
void virtio_console_port_io(struct virtio_console *con, unsigned id);

/* Poll events worth waiting for on port id's descriptor now (POLLIN when
 * the guest can take input, POLLOUT when output is waiting); 0 if none. */
short virtio_console_port_poll_events(const struct virtio_console *con, unsigned id);

/* Drops guest output buffered for port id but not yet written. */
void virtio_console_port_discard_output(struct virtio_console *con, unsigned id);

/* The descriptor the port let go of after EOF or a write error (the VMM
 * closes it), or -1. Clears it. */
int virtio_console_port_take_hungup_fd(struct virtio_console *con, unsigned id);

#endif
