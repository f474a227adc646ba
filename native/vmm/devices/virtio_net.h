/*
 * virtio-net (virtio id 1) on the virtio-pci modern transport: one receive
 * queue (0) and one transmit queue (1), no control queue, no multiqueue, no
 * offloads. Features: VIRTIO_F_VERSION_1, VIRTIO_NET_F_MAC (a fixed MAC
 * given at set-up) and VIRTIO_NET_F_STATUS (the link is always reported
 * up). Every buffer starts with the 12-byte virtio_net_hdr_v1: on receive it
 * is all zeros but num_buffers = 1; on transmit it is ignored, only its
 * length is checked.
 *
 * The host end is a connected unix stream socket (the library makes it
 * non-blocking and never closes it) carrying QEMU's "stream netdev"
 * framing: each Ethernet frame is preceded by its length as a 4-byte
 * big-endian integer. Frames are 14 to VNET_MAX_FRAME bytes; shorter or
 * longer ones from the guest are dropped, and a length prefix from the host
 * above VNET_MAX_FRAME is a protocol error that drops the connection (the
 * device lets go of the descriptor: virtio_net_take_hungup_fd).
 *
 * Memory is bounded both ways:
 *   - transmit: frames are copied whole, with their prefix, into a fixed
 *     buffer; when the socket does not take them (EAGAIN) and the buffer
 *     cannot hold the next frame, the device stops taking the guest's
 *     transmit buffers until the socket drains (POLLOUT);
 *   - receive: the socket is read only while the guest has posted receive
 *     buffers, into a fixed buffer of two maximal frames; each frame goes
 *     into one receive chain (the 12-byte header, then the frame). A frame
 *     too big for the chain offered is dropped and the chain kept for the
 *     next one. A driver reset keeps the bytes read: dropping part of a
 *     frame would break the stream's framing.
 * While no host end is connected, transmitted frames are dropped (an
 * unplugged cable) and nothing is received.
 *
 * Threads: the library has none. All calls for one device must come from one
 * thread at a time (the vCPU thread handling exits, or the VMM's poll loop
 * under the same lock).
 *
 * fork(2): all state is plain memory; the child continues with the parent's
 * rings. In the child the VMM calls virtio_net_set_fd() with the child's own
 * connection, which drops the parent's half-sent and half-received frames so
 * none leaks into the child's stream, then virtio_pci_resignal(&net->vp)
 * once its interrupt path is ready.
 */
#ifndef CLADE_VIRTIO_NET_H
#define CLADE_VIRTIO_NET_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "virtio_pci.h"

#define VNET_QUEUE_SIZE 256
#define VNET_RX_QUEUE 0
#define VNET_TX_QUEUE 1
#define VNET_HDR_BYTES 12 /* struct virtio_net_hdr_v1 */
#define VNET_MIN_FRAME 14 /* an Ethernet header */
#define VNET_MAX_FRAME 65535
#define VNET_PREFIX_BYTES 4
#define VNET_TX_BUF_SIZE (4 * (VNET_PREFIX_BYTES + VNET_MAX_FRAME))
#define VNET_RX_BUF_SIZE (2 * (VNET_PREFIX_BYTES + VNET_MAX_FRAME))

struct virtio_net {
    struct virtio_pci vp; /* first member */
    uint8_t mac[6];
    int fd;        /* the host end, -1 while disconnected */
    int hungup_fd; /* a descriptor let go after EOF, an error or a protocol error, for the VMM to close */
    const char *hangup_reason; /* why, for the VMM's log; static text */

    /* Guest -> host: whole prefixed frames not yet written. */
    uint8_t out[VNET_TX_BUF_SIZE];
    size_t out_start, out_len;
    /* Host -> guest: bytes read but not yet delivered (frames, and at most one partial one). */
    uint8_t in[VNET_RX_BUF_SIZE];
    size_t in_start, in_len;

    uint64_t tx_frames, rx_frames;     /* delivered, for status */
    uint64_t tx_dropped, rx_dropped;   /* malformed, too big for the chain, or no host end */
    struct virtq_chain chain;
};

/*
 * Saved state (docs/vmm-devices.md, "Saved state"): plain data only. No
 * chain is ever held between calls, so the rings' positions say it all; the
 * host end and the frames in flight are not saved (a restored device starts
 * disconnected, as after a cable is pulled).
 */
struct virtio_net_state {
    struct virtio_pci_state vp;
    uint8_t mac[6];
    uint8_t reserved[2]; /* 0 */
};

/* Sets the device up, disconnected, with that MAC. Then pci_bus_add(bus, &net->vp.pci). */
bool virtio_net_init(struct virtio_net *net, const uint8_t mac[6], const struct guest_mem *mem, virtio_msi_fn msi,
                     void *msi_ctx);

/* Connects the host end to fd (>= 0) or disconnects it (-1). The previous
 * descriptor is not closed. Either way the stream starts again: frames half
 * written to or half read from the previous descriptor are dropped. */
void virtio_net_set_fd(struct virtio_net *net, int fd);

/* Moves frames both ways: call when the descriptor polls readable or
 * writable (see virtio_net_poll_events). */
void virtio_net_io(struct virtio_net *net);

/* Poll events worth waiting for now (POLLIN while the guest has receive
 * buffers posted, POLLOUT while frames wait to be written); 0 if none. */
short virtio_net_poll_events(const struct virtio_net *net);

/* The descriptor the device let go of, or -1. Clears it. */
int virtio_net_take_hungup_fd(struct virtio_net *net);

void virtio_net_save(const struct virtio_net *net, struct virtio_net_state *s);
/* Loads s into a device freshly set up with the same MAC; it is disconnected
 * afterwards. False, net unchanged, on any mismatch or out-of-range value. */
bool virtio_net_restore(struct virtio_net *net, const struct virtio_net_state *s);

#endif
