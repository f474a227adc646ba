/*
 * Installs the CPL3 test guest: identity-mapped long-mode page tables, a GDT
 * with user segments and a TSS, the code from cpl3.S, and a vCPU that starts
 * directly at CPL3 in 64-bit mode. No guest code ever runs at CPL0.
 *
 * The IDT is left empty (limit 0) on purpose: any guest exception then
 * escalates to a triple fault, which is how the tests provoke a
 * KVM_EXIT_SHUTDOWN that the VMM must report.
 *
 * Its machine (cpl3_guest_ops) has no devices: ports read all ones, and two
 * MMIO registers outside RAM take the guest's reports and heartbeats.
 */
#include "../vmm.h"

#include <inttypes.h>
#include <string.h>
#include <sys/ioctl.h>

extern const uint8_t cpl3_guest_code[];
extern const uint8_t cpl3_guest_code_end[];

#define PTE_PRESENT 0x1u
#define PTE_WRITE 0x2u
#define PTE_USER 0x4u
#define PTE_HUGE 0x80u
#define TWO_MIB (2ull << 20)

/* GDT slots; selectors are index * 8, plus RPL 3 for the user ones. */
#define GDT_KERNEL_CODE 1
#define GDT_KERNEL_DATA 2
#define GDT_USER_DATA 3
#define GDT_USER_CODE 4
#define GDT_TSS 5 /* a 16-byte descriptor: slots 5 and 6 */
#define GDT_ENTRIES 7
#define TSS_LIMIT 0x67u

#define CR0_PE 0x1ull
#define CR0_MP 0x2ull
#define CR0_ET 0x10ull
#define CR0_NE 0x20ull
#define CR0_WP 0x10000ull
#define CR0_PG 0x80000000ull
#define CR4_PAE 0x20ull
#define CR4_OSFXSR 0x200ull
#define CR4_OSXMMEXCPT 0x400ull
#define EFER_LME 0x100ull
#define EFER_LMA 0x400ull
#define RFLAGS_RESERVED 0x2ull

static void write_u64(struct vm *vm, uint64_t gpa, uint64_t value) {
    memcpy(vm->ram + gpa, &value, sizeof value);
}

/*
 * PML4[0] -> PDPT[0] -> one PD of 2 MiB pages covering guest RAM (up to
 * 1 GiB), all user-accessible; PDPT[3] -> a PD mapping the 2 MiB MMIO window
 * at 3 GiB, which no memory slot backs.
 */
static void build_page_tables(struct vm *vm) {
    write_u64(vm, GUEST_PML4, GUEST_PDPT | PTE_PRESENT | PTE_WRITE | PTE_USER);
    write_u64(vm, GUEST_PDPT, GUEST_PD | PTE_PRESENT | PTE_WRITE | PTE_USER);
    uint64_t pages = vm->ram_size / TWO_MIB;
    if (pages > 512) pages = 512;
    for (uint64_t i = 0; i < pages; i++)
        write_u64(vm, GUEST_PD + i * 8, i * TWO_MIB | PTE_PRESENT | PTE_WRITE | PTE_USER | PTE_HUGE);
    write_u64(vm, GUEST_PDPT + 3 * 8, GUEST_PD_MMIO | PTE_PRESENT | PTE_WRITE | PTE_USER);
    write_u64(vm, GUEST_PD_MMIO, GUEST_MMIO_BASE | PTE_PRESENT | PTE_WRITE | PTE_USER | PTE_HUGE);
}

static uint64_t segment_descriptor(uint8_t access, uint8_t flags) {
    /* base 0, limit 0xfffff (ignored in 64-bit mode except for data checks) */
    return 0xffffull | (0xfull << 48) | ((uint64_t)access << 40) | ((uint64_t)flags << 52);
}

static void build_gdt(struct vm *vm) {
    uint64_t gdt[GDT_ENTRIES] = {0};
    gdt[GDT_KERNEL_CODE] = segment_descriptor(0x9a, 0xa); /* present, DPL0, code; G, L */
    gdt[GDT_KERNEL_DATA] = segment_descriptor(0x92, 0xc); /* present, DPL0, data; G, D */
    gdt[GDT_USER_DATA] = segment_descriptor(0xf2, 0xc);   /* present, DPL3, data */
    gdt[GDT_USER_CODE] = segment_descriptor(0xfa, 0xa);   /* present, DPL3, code, L */
    uint64_t base = GUEST_TSS;
    gdt[GDT_TSS] = TSS_LIMIT | ((base & 0xffffff) << 16) | (0x89ull << 40) | ((base >> 24 & 0xff) << 56);
    gdt[GDT_TSS + 1] = base >> 32;
    memcpy(vm->ram + GUEST_GDT, gdt, sizeof gdt);
    /* TSS: RSP0 for a ring change that never happens, and no I/O bitmap. */
    write_u64(vm, GUEST_TSS + 4, GUEST_STACK_TOP);
    uint16_t iomap_base = TSS_LIMIT + 1;
    memcpy(vm->ram + GUEST_TSS + 0x66, &iomap_base, sizeof iomap_base);
}

static struct kvm_segment flat_segment(uint16_t selector, uint8_t type, uint8_t dpl, int code) {
    return (struct kvm_segment){.base = 0, .limit = 0xffffffff, .selector = selector, .type = type, .present = 1,
                                .dpl = dpl, .db = code ? 0 : 1, .s = 1, .l = code ? 1 : 0, .g = 1};
}

static int set_cpl3_sregs(struct vm *vm) {
    struct kvm_sregs s;
    if (ioctl(vm->vcpu_fd, KVM_GET_SREGS, &s) < 0) return -1;
    s.cs = flat_segment(GDT_USER_CODE * 8 | 3, 0xb, 3, 1);
    s.ss = s.ds = s.es = s.fs = s.gs = flat_segment(GDT_USER_DATA * 8 | 3, 0x3, 3, 0);
    s.tr = (struct kvm_segment){.base = GUEST_TSS, .limit = TSS_LIMIT, .selector = GDT_TSS * 8, .type = 0xb, .present = 1};
    s.gdt = (struct kvm_dtable){.base = GUEST_GDT, .limit = GDT_ENTRIES * 8 - 1};
    s.idt = (struct kvm_dtable){.base = 0, .limit = 0};
    s.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG;
    s.cr3 = GUEST_PML4;
    s.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
    s.efer = EFER_LME | EFER_LMA;
    return ioctl(vm->vcpu_fd, KVM_SET_SREGS, &s);
}

void cpl3_guest_attach(struct cpl3_guest *g, const struct vm *vm, struct vcpu *cpu) {
    memset(g, 0, sizeof *g);
    g->vm = vm;
    g->cpu = cpu;
    cpu->ops = &cpl3_guest_ops;
    cpu->guest = g;
}

int cpl3_guest_install(struct vm *vm, struct cpl3_guest *g, struct vcpu *cpu) {
    size_t code_size = (size_t)(cpl3_guest_code_end - cpl3_guest_code);
    if (vm->ram_size < GUEST_STACK_TOP || code_size > GUEST_DATA - GUEST_CODE) return -1;
    build_page_tables(vm);
    build_gdt(vm);
    memcpy(vm->ram + GUEST_CODE, cpl3_guest_code, code_size);
    if (set_cpl3_sregs(vm) < 0) return -1;
    struct kvm_regs regs = {.rip = GUEST_CODE, .rsp = GUEST_STACK_TOP, .rflags = RFLAGS_RESERVED};
    if (ioctl(vm->vcpu_fd, KVM_SET_REGS, &regs) < 0) return -1;
    cpl3_guest_attach(g, vm, cpu);
    return 0;
}

/* ---- its machine ------------------------------------------------------------- */

/* No device behind any port: reads float high, as on real hardware; writes are dropped. */
static enum guest_exit_result cpl3_io(void *guest, uint16_t port, bool is_write, uint8_t *data, unsigned size) {
    (void)guest, (void)port;
    if (!is_write) memset(data, 0xff, size);
    return GUEST_EXIT_DONE;
}

static enum guest_exit_result cpl3_mmio(void *guest, uint64_t gpa, bool is_write, uint8_t *data, unsigned len) {
    struct cpl3_guest *g = guest;
    if (!is_write) {
        memset(data, 0xff, len);
        return GUEST_EXIT_DONE;
    }
    uint64_t value = 0;
    memcpy(&value, data, len <= sizeof value ? len : sizeof value);
    if (gpa == MMIO_REPORT) {
        atomic_store(&g->last_report, value);
        atomic_fetch_add(&g->reports, 1);
    } else if (gpa == MMIO_HEARTBEAT) {
        atomic_fetch_add(&g->heartbeats, 1);
        vcpu_idle(g->cpu);
    }
    return GUEST_EXIT_DONE;
}

/* A forked child counts its own reports and heartbeats. */
static void cpl3_forked(void *guest) {
    struct cpl3_guest *g = guest;
    atomic_store(&g->heartbeats, 0);
    atomic_store(&g->reports, 0);
    atomic_store(&g->last_report, 0);
}

static uint64_t guest_word(const struct vm *vm, uint64_t gpa) {
    const uint8_t *p = vm_guest_ptr(vm, gpa, 8);
    uint64_t v = 0;
    if (p) memcpy(&v, p, sizeof v);
    return v;
}

static void cpl3_status(void *guest, struct text_buf *out) {
    struct cpl3_guest *g = guest;
    tb_printf(out, ",\"counter\":%" PRIu64 ",\"ack\":%" PRIu64 ",\"heartbeats\":%" PRIu64 ",\"reports\":%" PRIu64
                   ",\"lastReport\":%" PRIu64,
              guest_word(g->vm, GUEST_DATA + GUEST_COUNTER), guest_word(g->vm, GUEST_DATA + GUEST_ACK),
              (uint64_t)atomic_load(&g->heartbeats), (uint64_t)atomic_load(&g->reports), (uint64_t)atomic_load(&g->last_report));
}

const struct guest_ops cpl3_guest_ops = {
    .name = "cpl3", .io = cpl3_io, .mmio = cpl3_mmio, .forked = cpl3_forked, .status = cpl3_status};
