/*
 * Control requests only the test build (build/clade-vmm-test) has: they read
 * and write guest RAM directly and drive the CPL3 test guest's mailbox,
 * which the fork tests and the benchmark need and the product has no use
 * for (docs/vmm.md, "Control protocol").
 *
 *   read GPA LEN        hex of LEN <= 4096 bytes
 *   write GPA HEX       <= 4096 bytes
 *   read64 GPA / write64 GPA VALUE
 *   guest CMD [ARG]     the test guest's mailbox: argument, then command; replies the ack count before it
 */
#include "vmm.h"

#include <inttypes.h>
#include <string.h>

#define GUEST_IO_MAX 4096

static int hex_digit(char ch) {
    if (ch >= '0' && ch <= '9') return ch - '0';
    if (ch >= 'a' && ch <= 'f') return ch - 'a' + 10;
    if (ch >= 'A' && ch <= 'F') return ch - 'A' + 10;
    return -1;
}

static uint64_t guest_u64(const struct vm *vm, uint64_t gpa) {
    uint64_t v = 0;
    const uint8_t *p = vm_guest_ptr(vm, gpa, 8);
    if (p) memcpy(&v, p, 8);
    return v;
}

static void cmd_read(struct vmm *v, int argc, char **argv, struct text_buf *out) {
    uint64_t gpa, len;
    if (argc != 3 || parse_u64(argv[1], &gpa) < 0 || parse_u64(argv[2], &len) < 0) return control_reply_error(out, "usage: read GPA LEN");
    if (len > GUEST_IO_MAX) return control_reply_error(out, "read is limited to 4096 bytes");
    const uint8_t *p = vm_guest_ptr(&v->vm, gpa, len);
    if (!p) return control_reply_error(out, "guest range out of bounds");
    tb_printf(out, "{\"ok\":true,\"hex\":\"");
    for (uint64_t i = 0; i < len; i++) tb_printf(out, "%02x", p[i]);
    tb_printf(out, "\"}");
}

static void cmd_write(struct vmm *v, int argc, char **argv, struct text_buf *out) {
    uint64_t gpa;
    if (argc != 3 || parse_u64(argv[1], &gpa) < 0) return control_reply_error(out, "usage: write GPA HEX");
    size_t digits = strlen(argv[2]);
    if (digits % 2 || digits / 2 > GUEST_IO_MAX) return control_reply_error(out, "hex must have an even length, at most 8192 digits");
    uint8_t bytes[GUEST_IO_MAX];
    for (size_t i = 0; i < digits / 2; i++) {
        int hi = hex_digit(argv[2][2 * i]), lo = hex_digit(argv[2][2 * i + 1]);
        if (hi < 0 || lo < 0) return control_reply_error(out, "bad hex digit");
        bytes[i] = (uint8_t)(hi << 4 | lo);
    }
    uint8_t *p = vm_guest_ptr(&v->vm, gpa, digits / 2);
    if (!p) return control_reply_error(out, "guest range out of bounds");
    memcpy(p, bytes, digits / 2);
    vcpu_kick(&v->cpu);
    control_reply_ok(out);
}

static void cmd_read64(struct vmm *v, int argc, char **argv, struct text_buf *out) {
    uint64_t gpa;
    if (argc != 2 || parse_u64(argv[1], &gpa) < 0) return control_reply_error(out, "usage: read64 GPA");
    if (!vm_guest_ptr(&v->vm, gpa, 8)) return control_reply_error(out, "guest range out of bounds");
    tb_printf(out, "{\"ok\":true,\"value\":%" PRIu64 "}", guest_u64(&v->vm, gpa));
}

static void cmd_write64(struct vmm *v, int argc, char **argv, struct text_buf *out) {
    uint64_t gpa, value;
    if (argc != 3 || parse_u64(argv[1], &gpa) < 0 || parse_u64(argv[2], &value) < 0) return control_reply_error(out, "usage: write64 GPA VALUE");
    uint8_t *p = vm_guest_ptr(&v->vm, gpa, 8);
    if (!p) return control_reply_error(out, "guest range out of bounds");
    /* An aligned 8-byte store: the running guest never sees a torn value. */
    if (gpa % 8 == 0) atomic_store((_Atomic uint64_t *)(void *)p, value);
    else memcpy(p, &value, 8);
    vcpu_kick(&v->cpu);
    control_reply_ok(out);
}

/* Mailbox of the test guest: argument first, then the command word the guest polls. */
static void cmd_guest(struct vmm *v, int argc, char **argv, struct text_buf *out) {
    uint64_t command, arg = 0;
    if (argc < 2 || argc > 3 || parse_u64(argv[1], &command) < 0 || (argc == 3 && parse_u64(argv[2], &arg) < 0))
        return control_reply_error(out, "usage: guest CMD [ARG]");
    if (v->cpu.ops != &cpl3_guest_ops) return control_reply_error(out, "guest commands are for the CPL3 test guest");
    _Atomic uint64_t *mailbox = (_Atomic uint64_t *)(void *)(v->vm.ram + GUEST_DATA);
    uint64_t ack = atomic_load(&mailbox[GUEST_ACK / 8]);
    atomic_store(&mailbox[GUEST_ARG / 8], arg);
    atomic_store(&mailbox[GUEST_CMD / 8], command);
    vcpu_kick(&v->cpu);
    tb_printf(out, "{\"ok\":true,\"ack\":%" PRIu64 "}", ack);
}

const struct control_command control_test_commands[] = {
    {"read", cmd_read}, {"write", cmd_write}, {"read64", cmd_read64}, {"write64", cmd_write64}, {"guest", cmd_guest}, {NULL, NULL},
};
