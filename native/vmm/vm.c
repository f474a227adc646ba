/*
 * The KVM VM, its guest RAM and its single vCPU.
 *
 * vm_open() runs once in the root VMM: it opens /dev/kvm, maps guest RAM and
 * learns what the host supports (CPUID, MSRs, XSAVE size). Those facts are
 * plain memory, so every forked child inherits them and only has to call
 * vm_build_kvm_objects() to get a fresh VM over the same RAM.
 */
#include "vmm.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#define HUGE_PAGE (2u << 20)
/* Real-mode helper areas KVM wants below 4 GiB, out of the way of guest RAM. */
#define TSS_ADDR 0xfffbd000u
#define IDENTITY_MAP_ADDR 0xfffbc000u
/* What KVM copies into kvm_run at every KVM_RUN return (state.c captures them from there). */
#define SYNC_FIELDS (KVM_SYNC_X86_REGS | KVM_SYNC_X86_SREGS | KVM_SYNC_X86_EVENTS)

static int check_cap(int fd, long cap) {
    int r = ioctl(fd, KVM_CHECK_EXTENSION, cap);
    return r < 0 ? 0 : r;
}

/*
 * Private anonymous memory: fork(2) then gives each child a copy-on-write
 * view. Transparent huge pages make fork copy 2 MiB page-table entries
 * instead of 4 KiB ones (measured ~15x faster fork on 256 MiB).
 */
static uint8_t *map_guest_ram(uint64_t size) {
    size_t span = (size_t)size + HUGE_PAGE;
    uint8_t *raw = mmap(NULL, span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (raw == MAP_FAILED) return NULL;
    uintptr_t aligned = ((uintptr_t)raw + HUGE_PAGE - 1) & ~(uintptr_t)(HUGE_PAGE - 1);
    size_t head = aligned - (uintptr_t)raw;
    if (head) munmap(raw, head);
    size_t tail = span - head - (size_t)size;
    if (tail) munmap((uint8_t *)aligned + size, tail);
    madvise((void *)aligned, (size_t)size, MADV_HUGEPAGE);
    return (uint8_t *)aligned;
}

static struct kvm_cpuid2 *supported_cpuid(int kvm_fd) {
    size_t bytes = sizeof(struct kvm_cpuid2) + VMM_MAX_CPUID_ENTRIES * sizeof(struct kvm_cpuid_entry2);
    struct kvm_cpuid2 *cpuid = calloc(1, bytes);
    if (!cpuid) return NULL;
    cpuid->nent = VMM_MAX_CPUID_ENTRIES;
    if (ioctl(kvm_fd, KVM_GET_SUPPORTED_CPUID, cpuid) < 0) {
        free(cpuid);
        return NULL;
    }
    return cpuid;
}

int vm_open(struct vm *vm, uint64_t ram_size) {
    if (vm_open_kvm(vm) < 0) return -1;
    vm->ram_size = ram_size;
    vm->ram = map_guest_ram(ram_size);
    return vm->ram ? 0 : -1;
}

/* Everything but guest RAM: a start from a snapshot maps RAM from its file instead. */
int vm_open_kvm(struct vm *vm) {
    memset(vm, 0, sizeof *vm);
    vm->vm_fd = vm->vcpu_fd = -1;
    vm->kvm_fd = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (vm->kvm_fd < 0) return -1;
    if (ioctl(vm->kvm_fd, KVM_GET_API_VERSION, 0) != KVM_API_VERSION) return errno = ENOTSUP, -1;
    int run_size = ioctl(vm->kvm_fd, KVM_GET_VCPU_MMAP_SIZE, 0);
    if (run_size <= 0) return -1;
    vm->run_size = (size_t)run_size;
    vm->cpuid = supported_cpuid(vm->kvm_fd);
    if (!vm->cpuid) return -1;
    vm->has_xcrs = check_cap(vm->kvm_fd, KVM_CAP_XCRS);
    vm->has_sregs2 = check_cap(vm->kvm_fd, KVM_CAP_SREGS2);
    vm->has_debugregs = check_cap(vm->kvm_fd, KVM_CAP_DEBUGREGS);
    vm->has_sync_regs = (check_cap(vm->kvm_fd, KVM_CAP_SYNC_REGS) & SYNC_FIELDS) == SYNC_FIELDS;
    return 0;
}

/* Facts that need a VM fd to ask: the XSAVE buffer size and the TSC offset attribute. */
void vm_learn_features(struct vm *vm) {
    int xsave2 = check_cap(vm->vm_fd, KVM_CAP_XSAVE2);
    if (xsave2 > 0) {
        vm->has_xsave2 = 1;
        vm->xsave_size = (uint32_t)xsave2;
    } else if (check_cap(vm->kvm_fd, KVM_CAP_XSAVE)) {
        vm->xsave_size = sizeof(struct kvm_xsave);
    }
    if (vm->xsave_size && vm->xsave_size < sizeof(struct kvm_xsave)) vm->xsave_size = sizeof(struct kvm_xsave);
    struct kvm_device_attr attr = {.group = KVM_VCPU_TSC_CTRL, .attr = KVM_VCPU_TSC_OFFSET};
    vm->has_tsc_offset_attr = ioctl(vm->vcpu_fd, KVM_HAS_DEVICE_ATTR, &attr) == 0;
}

/*
 * Creates the VM, memory slot, irqchip, PIT and vCPU. The memory slot goes in
 * before KVM_CREATE_IRQCHIP: registering it afterwards waits for an SRCU
 * grace period (~7 ms measured here) on the fork critical path.
 *
 * kvm_valid_regs is set once, for good: every KVM_RUN return (the EINTR that
 * parks the vCPU included) then leaves REGS, SREGS and VCPU_EVENTS in
 * kvm_run, so capturing them costs no ioctl. Each vCPU ioctl costs ~8 us
 * here (vcpu_load/vcpu_put, from any thread); storing the three at every
 * exit did not change the exit rate measurably (~13.5k MMIO exits/s either way).
 */
int vm_build_kvm_objects(struct vm *vm) {
    vm->vm_fd = ioctl(vm->kvm_fd, KVM_CREATE_VM, 0);
    if (vm->vm_fd < 0) return -1;
    if (ioctl(vm->vm_fd, KVM_SET_TSS_ADDR, TSS_ADDR) < 0) return -1;
    uint64_t identity = IDENTITY_MAP_ADDR;
    if (ioctl(vm->vm_fd, KVM_SET_IDENTITY_MAP_ADDR, &identity) < 0) return -1;
    struct kvm_userspace_memory_region slot = {
        .slot = 0, .guest_phys_addr = 0, .memory_size = vm->ram_size, .userspace_addr = (uint64_t)(uintptr_t)vm->ram};
    if (ioctl(vm->vm_fd, KVM_SET_USER_MEMORY_REGION, &slot) < 0) return -1;
    if (ioctl(vm->vm_fd, KVM_CREATE_IRQCHIP, 0) < 0) return -1;
    struct kvm_pit_config pit = {.flags = KVM_PIT_SPEAKER_DUMMY};
    if (ioctl(vm->vm_fd, KVM_CREATE_PIT2, &pit) < 0) return -1;
    vm->vcpu_fd = ioctl(vm->vm_fd, KVM_CREATE_VCPU, 0);
    if (vm->vcpu_fd < 0) return -1;
    vm->run = mmap(NULL, vm->run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vm->vcpu_fd, 0);
    if (vm->run == MAP_FAILED) return vm->run = NULL, -1;
    if (vm->has_sync_regs) vm->run->kvm_valid_regs = SYNC_FIELDS;
    if (ioctl(vm->vcpu_fd, KVM_SET_CPUID2, vm->cpuid) < 0) return -1;
    return 0;
}

static int msr_round_trips(int vcpu_fd, uint32_t index) {
    struct {
        struct kvm_msrs hdr;
        struct kvm_msr_entry entry;
    } one = {.hdr.nmsrs = 1, .entry.index = index};
    if (ioctl(vcpu_fd, KVM_GET_MSRS, &one) != 1) return 0;
    return ioctl(vcpu_fd, KVM_SET_MSRS, &one) == 1;
}

/*
 * Keeps every MSR KVM lists that can be read and written back, so capture
 * and restore are one ioctl each. Runs once in the root, before the guest starts.
 */
int vm_probe_msrs(struct vm *vm) {
    size_t bytes = sizeof(struct kvm_msr_list) + 1024 * sizeof(uint32_t);
    struct kvm_msr_list *list = calloc(1, bytes);
    if (!list) return -1;
    list->nmsrs = 1024;
    if (ioctl(vm->kvm_fd, KVM_GET_MSR_INDEX_LIST, list) < 0) {
        free(list);
        return -1;
    }
    vm->msr_count = 0;
    for (uint32_t i = 0; i < list->nmsrs && vm->msr_count < VMM_MAX_MSRS; i++)
        if (msr_round_trips(vm->vcpu_fd, list->indices[i])) vm->msr_index[vm->msr_count++] = list->indices[i];
    free(list);
    return 0;
}

struct stale_kvm_objects {
    int vm_fd;
    int vcpu_fd;
    struct kvm_run *run;
    size_t run_size;
};

static void *close_stale_objects(void *arg) {
    struct stale_kvm_objects *stale = arg;
    if (stale->run) munmap(stale->run, stale->run_size);
    if (stale->vcpu_fd >= 0) close(stale->vcpu_fd);
    if (stale->vm_fd >= 0) close(stale->vm_fd);
    free(stale);
    return NULL;
}

/*
 * A forked child inherits the parent's VM and vCPU fds (unusable: KVM binds a
 * VM to the process that created it). Dropping the last reference to a VM
 * costs 6-30 ms here, so this happens on a detached thread, off the path to
 * a running child.
 */
void vm_close_kvm_objects_later(int vm_fd, int vcpu_fd, struct kvm_run *run, size_t run_size) {
    struct stale_kvm_objects *stale = malloc(sizeof *stale);
    if (!stale) return; /* leaking two fds is harmless; blocking here is not */
    *stale = (struct stale_kvm_objects){vm_fd, vcpu_fd, run, run_size};
    pthread_t t;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    if (pthread_create(&t, &attr, close_stale_objects, stale) != 0) close_stale_objects(stale);
    pthread_attr_destroy(&attr);
}

uint8_t *vm_guest_ptr(const struct vm *vm, uint64_t gpa, uint64_t len) {
    if (gpa > vm->ram_size || len > vm->ram_size - gpa) return NULL;
    return vm->ram + gpa;
}
