/*
 * Capture and restore of the whole machine: vCPU registers, special
 * registers, FPU/XSAVE, XCRs, MSRs, LAPIC, pending events, MP state, debug
 * registers, TSC offset, and VM-wide state: PIC master/slave, IOAPIC, PIT
 * and kvmclock.
 *
 * Capture happens with the vCPU parked at a safe point (its last KVM_RUN
 * returned EINTR, so no I/O or MMIO is half done). Restore runs in a fresh
 * VM in the forked child, in an order where each step's dependencies are
 * already in place (see restore_steps and docs/vmm.md).
 */
#include "vmm.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <x86intrin.h>

#define MSR_IA32_TSC 0x10u

typedef int (*state_step)(const struct vm *vm, struct machine_state *st);

struct named_step {
    const char *name;
    state_step run;
};

static int run_steps(const struct named_step *steps, size_t n, const struct vm *vm, struct machine_state *st,
                     const char **failed) {
    for (size_t i = 0; i < n; i++) {
        if (steps[i].run(vm, st) < 0) {
            if (failed) *failed = steps[i].name;
            return -1;
        }
    }
    return 0;
}

int state_alloc(const struct vm *vm, struct machine_state *st) {
    memset(st, 0, sizeof *st);
    if (vm->xsave_size) {
        st->xsave = calloc(1, vm->xsave_size);
        if (!st->xsave) return -1;
    }
    st->msrs = calloc(1, sizeof(struct kvm_msrs) + VMM_MAX_MSRS * sizeof(struct kvm_msr_entry));
    return st->msrs ? 0 : -1;
}

/* ---- capture ---------------------------------------------------------- */

/*
 * REGS, SREGS and VCPU_EVENTS come from kvm_run when KVM keeps them there
 * (vm.c sets kvm_valid_regs once, for good): KVM stores them at every return
 * from KVM_RUN, after finishing any pending I/O, and the vCPU parks only
 * after such a return (an EINTR) and has not run since. That saves three
 * vCPU ioctls of ~8 us each from the pause.
 */
static int get_regs(const struct vm *vm, struct machine_state *st) {
    if (vm->has_sync_regs) {
        st->vcpu.regs = vm->run->s.regs.regs;
        return 0;
    }
    return ioctl(vm->vcpu_fd, KVM_GET_REGS, &st->vcpu.regs);
}

/* CR0.PG and CR4.PAE without EFER.LMA: the CPU uses the four PDPTRs it loaded, which only SREGS2 carries. */
static int pae_paging(const struct kvm_sregs *s) {
    return (s->cr0 & (1ull << 31)) && (s->cr4 & (1ull << 5)) && !(s->efer & (1ull << 10));
}

/*
 * Outside PAE paging SREGS2 is SREGS without the interrupt bitmap (and
 * flags 0): an injected interrupt travels in VCPU_EVENTS either way.
 */
static void sregs2_from_sregs(struct kvm_sregs2 *d, const struct kvm_sregs *s) {
    memset(d, 0, sizeof *d);
    d->cs = s->cs, d->ds = s->ds, d->es = s->es, d->fs = s->fs, d->gs = s->gs, d->ss = s->ss;
    d->tr = s->tr, d->ldt = s->ldt, d->gdt = s->gdt, d->idt = s->idt;
    d->cr0 = s->cr0, d->cr2 = s->cr2, d->cr3 = s->cr3, d->cr4 = s->cr4, d->cr8 = s->cr8;
    d->efer = s->efer, d->apic_base = s->apic_base;
}

static int get_sregs(const struct vm *vm, struct machine_state *st) {
    if (vm->has_sync_regs) {
        const struct kvm_sregs *synced = &vm->run->s.regs.sregs;
        if (!vm->has_sregs2) {
            st->vcpu.sregs = *synced;
            return 0;
        }
        if (!pae_paging(synced)) {
            sregs2_from_sregs(&st->vcpu.sregs2, synced);
            return 0;
        }
    }
    if (vm->has_sregs2) return ioctl(vm->vcpu_fd, KVM_GET_SREGS2, &st->vcpu.sregs2);
    return ioctl(vm->vcpu_fd, KVM_GET_SREGS, &st->vcpu.sregs);
}

static int get_fpu(const struct vm *vm, struct machine_state *st) {
    if (vm->has_xsave2) return ioctl(vm->vcpu_fd, KVM_GET_XSAVE2, st->xsave);
    if (vm->xsave_size) return ioctl(vm->vcpu_fd, KVM_GET_XSAVE, st->xsave);
    return ioctl(vm->vcpu_fd, KVM_GET_FPU, &st->vcpu.fpu);
}

static int get_xcrs(const struct vm *vm, struct machine_state *st) {
    return vm->has_xcrs ? ioctl(vm->vcpu_fd, KVM_GET_XCRS, &st->vcpu.xcrs) : 0;
}

static int get_msrs(const struct vm *vm, struct machine_state *st) {
    struct kvm_msrs *msrs = st->msrs;
    st->vcpu.host_tsc = __rdtsc();
    msrs->nmsrs = vm->msr_count;
    for (uint32_t i = 0; i < vm->msr_count; i++) msrs->entries[i] = (struct kvm_msr_entry){.index = vm->msr_index[i]};
    int got = ioctl(vm->vcpu_fd, KVM_GET_MSRS, msrs);
    if (got < 0) return -1;
    if ((uint32_t)got != vm->msr_count) return errno = EIO, -1;
    return 0;
}

static int get_lapic(const struct vm *vm, struct machine_state *st) {
    return ioctl(vm->vcpu_fd, KVM_GET_LAPIC, &st->vcpu.lapic);
}

static int get_events(const struct vm *vm, struct machine_state *st) {
    if (vm->has_sync_regs) {
        st->vcpu.events = vm->run->s.regs.events;
        return 0;
    }
    return ioctl(vm->vcpu_fd, KVM_GET_VCPU_EVENTS, &st->vcpu.events);
}

static int get_mp_state(const struct vm *vm, struct machine_state *st) {
    return ioctl(vm->vcpu_fd, KVM_GET_MP_STATE, &st->vcpu.mp_state);
}

static int get_debugregs(const struct vm *vm, struct machine_state *st) {
    return vm->has_debugregs ? ioctl(vm->vcpu_fd, KVM_GET_DEBUGREGS, &st->vcpu.debugregs) : 0;
}

static int tsc_offset_attr(const struct vm *vm, struct machine_state *st, unsigned long request) {
    if (!vm->has_tsc_offset_attr) return 0;
    struct kvm_device_attr attr = {
        .group = KVM_VCPU_TSC_CTRL, .attr = KVM_VCPU_TSC_OFFSET, .addr = (uint64_t)(uintptr_t)&st->vcpu.tsc_offset};
    return ioctl(vm->vcpu_fd, request, &attr);
}

static int get_tsc_offset(const struct vm *vm, struct machine_state *st) {
    return tsc_offset_attr(vm, st, KVM_GET_DEVICE_ATTR);
}

static int irqchip_io(const struct vm *vm, struct kvm_irqchip *chip, uint32_t id, unsigned long request) {
    chip->chip_id = id;
    return ioctl(vm->vm_fd, request, chip);
}

static int get_irqchip(const struct vm *vm, struct machine_state *st) {
    if (irqchip_io(vm, &st->vm.pic_master, KVM_IRQCHIP_PIC_MASTER, KVM_GET_IRQCHIP) < 0) return -1;
    if (irqchip_io(vm, &st->vm.pic_slave, KVM_IRQCHIP_PIC_SLAVE, KVM_GET_IRQCHIP) < 0) return -1;
    return irqchip_io(vm, &st->vm.ioapic, KVM_IRQCHIP_IOAPIC, KVM_GET_IRQCHIP);
}

static int get_pit(const struct vm *vm, struct machine_state *st) {
    return ioctl(vm->vm_fd, KVM_GET_PIT2, &st->vm.pit);
}

static int get_clock(const struct vm *vm, struct machine_state *st) {
    return ioctl(vm->vm_fd, KVM_GET_CLOCK, &st->vm.clock);
}

static const struct named_step capture_steps[] = {
    {"regs", get_regs},       {"sregs", get_sregs},   {"fpu", get_fpu},
    {"xcrs", get_xcrs},       {"msrs", get_msrs},     {"lapic", get_lapic},
    {"events", get_events},   {"mp_state", get_mp_state}, {"debugregs", get_debugregs},
    {"tsc_offset", get_tsc_offset}, {"irqchip", get_irqchip}, {"pit", get_pit},
    {"clock", get_clock},
};

int state_capture(const struct vm *vm, struct machine_state *st, const char **failed) {
    return run_steps(capture_steps, sizeof capture_steps / sizeof capture_steps[0], vm, st, failed);
}

/* ---- restore ---------------------------------------------------------- */

/* Special registers first: they carry EFER, CR0/CR4 and the APIC base that MSR and LAPIC writes are checked against. */
static int set_sregs(const struct vm *vm, struct machine_state *st) {
    if (vm->has_sregs2) return ioctl(vm->vcpu_fd, KVM_SET_SREGS2, &st->vcpu.sregs2);
    return ioctl(vm->vcpu_fd, KVM_SET_SREGS, &st->vcpu.sregs);
}

/*
 * Without the TSC offset attribute the TSC MSR is all there is: move it on by
 * the host TSC ticks since capture (the guest TSC runs at the host rate), so
 * the child's TSC does not jump back by the fork time.
 */
static void advance_guest_tsc(struct kvm_msr_entry *entries, uint32_t n, uint64_t host_tsc_at_capture) {
    uint64_t elapsed = __rdtsc() - host_tsc_at_capture;
    for (uint32_t i = 0; i < n; i++)
        if (entries[i].index == MSR_IA32_TSC) entries[i].data += elapsed;
}

/*
 * One KVM_SET_MSRS for all; KVM stops at the first MSR it refuses, so the
 * rest are retried past it and the refusals only counted (status reports them).
 */
static int set_msrs(const struct vm *vm, struct machine_state *st) {
    static struct {
        struct kvm_msrs hdr;
        struct kvm_msr_entry entries[VMM_MAX_MSRS];
    } batch;
    struct kvm_msr_entry *all = st->msrs->entries;
    uint32_t done = 0;
    st->msrs_not_restored = 0;
    if (!vm->has_tsc_offset_attr) advance_guest_tsc(all, vm->msr_count, st->vcpu.host_tsc);
    while (done < vm->msr_count) {
        uint32_t left = vm->msr_count - done;
        batch.hdr.nmsrs = left;
        memcpy(batch.entries, all + done, left * sizeof all[0]);
        int set = ioctl(vm->vcpu_fd, KVM_SET_MSRS, &batch);
        if (set < 0) return -1;
        done += (uint32_t)set;
        if ((uint32_t)set < left) {
            st->msrs_not_restored++;
            done++;
        }
    }
    return 0;
}

static int set_regs(const struct vm *vm, struct machine_state *st) {
    return ioctl(vm->vcpu_fd, KVM_SET_REGS, &st->vcpu.regs);
}

static int set_xcrs(const struct vm *vm, struct machine_state *st) {
    return vm->has_xcrs ? ioctl(vm->vcpu_fd, KVM_SET_XCRS, &st->vcpu.xcrs) : 0;
}

static int set_fpu(const struct vm *vm, struct machine_state *st) {
    if (vm->xsave_size) return ioctl(vm->vcpu_fd, KVM_SET_XSAVE, st->xsave);
    return ioctl(vm->vcpu_fd, KVM_SET_FPU, &st->vcpu.fpu);
}

static int set_lapic(const struct vm *vm, struct machine_state *st) {
    return ioctl(vm->vcpu_fd, KVM_SET_LAPIC, &st->vcpu.lapic);
}

static int set_mp_state(const struct vm *vm, struct machine_state *st) {
    return ioctl(vm->vcpu_fd, KVM_SET_MP_STATE, &st->vcpu.mp_state);
}

/* Pending exceptions/interrupts/NMIs go in last, onto a vCPU whose mode is final. */
static int set_events(const struct vm *vm, struct machine_state *st) {
    st->vcpu.events.flags |= KVM_VCPUEVENT_VALID_NMI_PENDING | KVM_VCPUEVENT_VALID_SIPI_VECTOR;
    return ioctl(vm->vcpu_fd, KVM_SET_VCPU_EVENTS, &st->vcpu.events);
}

static int set_debugregs(const struct vm *vm, struct machine_state *st) {
    return vm->has_debugregs ? ioctl(vm->vcpu_fd, KVM_SET_DEBUGREGS, &st->vcpu.debugregs) : 0;
}

/*
 * The parent's TSC offset, not the TSC MSR value: guest TSC = host TSC +
 * offset, so parent and child read one continuous TSC, with no jump back
 * by the time the fork took. Done after the MSRs, which moved it.
 */
static int set_tsc_offset(const struct vm *vm, struct machine_state *st) {
    return tsc_offset_attr(vm, st, KVM_SET_DEVICE_ATTR);
}

static int set_irqchip(const struct vm *vm, struct machine_state *st) {
    if (irqchip_io(vm, &st->vm.pic_master, KVM_IRQCHIP_PIC_MASTER, KVM_SET_IRQCHIP) < 0) return -1;
    if (irqchip_io(vm, &st->vm.pic_slave, KVM_IRQCHIP_PIC_SLAVE, KVM_SET_IRQCHIP) < 0) return -1;
    return irqchip_io(vm, &st->vm.ioapic, KVM_IRQCHIP_IOAPIC, KVM_SET_IRQCHIP);
}

static int set_pit(const struct vm *vm, struct machine_state *st) {
    return ioctl(vm->vm_fd, KVM_SET_PIT2, &st->vm.pit);
}

/*
 * kvmclock: with KVM_CLOCK_REALTIME in the captured flags KVM advances the
 * clock by the real time that passed since capture, so the child's clock
 * matches the parent's instead of lagging by the fork time.
 */
static int set_clock(const struct vm *vm, struct machine_state *st) {
    struct kvm_clock_data clock = st->vm.clock;
    clock.flags &= KVM_CLOCK_REALTIME | KVM_CLOCK_HOST_TSC;
    return ioctl(vm->vm_fd, KVM_SET_CLOCK, &clock);
}

static const struct named_step restore_steps[] = {
    {"sregs", set_sregs},       {"msrs", set_msrs},         {"regs", set_regs},
    {"xcrs", set_xcrs},         {"fpu", set_fpu},           {"lapic", set_lapic},
    {"mp_state", set_mp_state}, {"events", set_events},     {"debugregs", set_debugregs},
    {"tsc_offset", set_tsc_offset}, {"irqchip", set_irqchip}, {"pit", set_pit},
    {"clock", set_clock},
};

int state_restore(const struct vm *vm, struct machine_state *st, const char **failed) {
    return run_steps(restore_steps, sizeof restore_steps / sizeof restore_steps[0], vm, st, failed);
}
