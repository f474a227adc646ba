/*
 * Fuzz target: the loader of a vmm snapshot's state.bin (snapshot_format.c)
 * and the device state it carries (board_restore), as a start from a
 * snapshot runs them, minus KVM. The input is a state.bin. Its checksum
 * field is recomputed first: the checksum only catches accidental damage,
 * and a forger recomputes it too, so the checks behind it are what must hold.
 *
 * A decoded device state is loaded into a fresh board over guest RAM of the
 * recorded size; if the board takes it, the guest side is then exercised
 * (every queue notified, PCI config read) to show the restored state is safe
 * to run with, not only to load.
 */
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "../../vmm.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void notify_all(struct board *b, struct virtio_pci *vp)
{
    uint64_t bar = pci_bar_address(&vp->pci, VIRTIO_PCI_BAR);
    for (unsigned q = 0; q < VIRTIO_PCI_MAX_QUEUES; q++) {
        uint8_t v[2] = {(uint8_t)q, 0};
        board_mmio(b, bar + VIRTIO_PCI_NOTIFY_OFFSET + VIRTIO_PCI_NOTIFY_MULTIPLIER * q, true, v, 2);
    }
}

static void exercise(struct board *b)
{
    notify_all(b, &b->con.vp);
    if (b->net.present)
        notify_all(b, &b->nic.vp);
    for (unsigned off = 0; off < PCI_CONFIG_SIZE; off += 4) {
        uint8_t addr[4], word[4];
        pci_put_le(addr, 4, 0x80000000u | 1u << 11 | off);
        board_io(b, PCI_CONFIG_ADDRESS_PORT, true, addr, 4);
        board_io(b, PCI_CONFIG_DATA_PORT, false, word, 4);
    }
    uint8_t byte = 'x';
    board_io(b, UART_COM1_BASE, true, &byte, 1);
    board_io(b, UART_COM1_BASE, false, &byte, 1);
    virtio_console_port_io(&b->con, BOARD_AGENT_PORT);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static struct snapshot_image img;
    static struct board board;
    uint8_t *buf = malloc(size ? size : 1);
    if (!buf)
        return 0;
    if (size)
        memcpy(buf, data, size);
    if (size >= sizeof(struct snapshot_header)) {
        uint64_t sum = snapshot_checksum(buf, size);
        memcpy(buf + offsetof(struct snapshot_header, checksum), &sum, sizeof sum);
    }
    char err[300];
    if (snapshot_decode(buf, size, &img, err, sizeof err) == 0 && img.has_board) {
        struct vm vm = {.kvm_fd = -1, .vm_fd = -1, .vcpu_fd = -1, .ram_size = img.ram_size};
        vm.ram = mmap(NULL, img.ram_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (vm.ram != MAP_FAILED) {
            struct serial_log log;
            serial_log_none(&log, SERIAL_LOG_DEFAULT_MAX);
            /* A NIC exactly when the file says so (the command line's --net), never connected. */
            const struct board_net net = {.present = img.board.net.present == 1, .fd = -1};
            if (board_init(&board, &vm, &log, -1, "", NULL, &net) == 0 && board_restore(&board, &img.board) == 0)
                exercise(&board);
            board_destroy(&board);
            munmap(vm.ram, img.ram_size);
        }
    }
    free(buf);
    return 0;
}
