/*
 * Writes seed inputs for fuzz_state: state.bin files as clade-vmm writes
 * them, built from plain values (no KVM needed). `state_seed DIR` writes
 * DIR/cpl3 (no devices), DIR/fresh-board (a Linux guest's board as
 * board_init builds it) and DIR/fresh-board-net (the same with a NIC). A
 * Linux guest's real snapshot, taken after boot, is checked in beside them
 * (linux-booted; its device section was widened with zeros, no disk and no
 * NIC, when the format grew).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "../../vmm.h"

static int write_seed(const char *dir, const char *name, const struct snapshot_image *img)
{
    uint8_t *data;
    size_t len;
    char path[4096];
    if (snapshot_encode(img, &data, &len) < 0)
        return -1;
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, "wb");
    int ok = f && fwrite(data, 1, len, f) == len;
    if (f)
        ok = fclose(f) == 0 && ok;
    free(data);
    return ok ? 0 : -1;
}

int main(int argc, char **argv)
{
    if (argc != 2)
        return fprintf(stderr, "usage: state_seed DIR\n"), 2;
    static struct snapshot_image img;
    static uint8_t xsave[4096];
    memset(&img, 0, sizeof img);
    img.ram_size = 64ull << 20;
    img.facts = (struct snapshot_vm_facts){.msr_count = 2, .xsave_size = sizeof xsave, .has_xsave2 = 1, .has_xcrs = 1,
                                           .has_sregs2 = 1, .has_tsc_offset_attr = 1, .has_debugregs = 1};
    img.facts.msr_index[0] = 0x10, img.facts.msr_index[1] = 0xc0000080;
    img.msrs[0].index = 0x10, img.msrs[1].index = 0xc0000080;
    img.cpuid_count = 2;
    img.cpuid[1].function = 1;
    img.xsave = xsave;
    img.vcpu.mp_state.mp_state = KVM_MP_STATE_RUNNABLE;
    if (write_seed(argv[1], "cpl3", &img) < 0)
        return perror("cpl3"), 1;

    struct vm vm = {.kvm_fd = -1, .vm_fd = -1, .vcpu_fd = -1, .ram_size = img.ram_size};
    vm.ram = mmap(NULL, vm.ram_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    static struct board b;
    struct serial_log log;
    serial_log_none(&log, SERIAL_LOG_DEFAULT_MAX);
    if (vm.ram == MAP_FAILED || board_init(&b, &vm, &log, -1, "", NULL, NULL) < 0)
        return perror("board"), 1;
    img.facts.guest_linux = 1;
    img.has_board = 1;
    board_save(&b, &img.board);
    board_destroy(&b);
    if (write_seed(argv[1], "fresh-board", &img) < 0)
        return perror("fresh-board"), 1;

    /* The same board with a NIC (--net), as board_init builds it before the network socket is connected. */
    const struct board_net net = {.present = true, .fd = -1};
    if (board_init(&b, &vm, &log, -1, "", NULL, &net) < 0)
        return perror("board with a NIC"), 1;
    board_save(&b, &img.board);
    board_destroy(&b);
    if (write_seed(argv[1], "fresh-board-net", &img) < 0)
        return perror("fresh-board-net"), 1;
    return 0;
}
