/*
 * PVH boot of a Linux kernel (the x86 "PVH" boot ABI, as published with
 * Xen's public headers and used by Linux's CONFIG_PVH): the uncompressed ELF
 * vmlinux is loaded at the physical addresses of its PT_LOAD segments, and
 * the vCPU starts at the 32-bit entry named by the ELF note ("Xen", type 18)
 * in flat protected mode with paging off and EBX = the start_info address.
 * start_info carries the command line, the initramfs as module 0 and the
 * memory map. No firmware runs and the kernel needs no decompressor.
 *
 * Everything read from the files is bounds-checked against guest RAM: a bad
 * kernel file is refused, never written outside RAM.
 */
#include "../vmm.h"

#include <elf.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

#define PVH_MAGIC 0x336ec578u
#define PVH_NOTE_PHYS32_ENTRY 18
#define E820_RAM 1
#define E820_RESERVED 2
#define LOW_RAM_END 0xa0000ull  /* VGA/ROM hole above, reserved by the kernel itself */
#define HIGH_RAM_START 0x100000ull
#define MAX_NOTES_BYTES (64u << 10)
#define PAGE 4096ull

/* Boot structures live in the first MiB, which Linux keeps reserved. */
#define START_INFO_GPA 0x6000ull
#define MODLIST_GPA 0x6100ull
#define MEMMAP_GPA 0x6200ull
#define MEMMAP_MAX 8
#define CMDLINE_GPA 0x7000ull
#define CMDLINE_MAX 2048 /* x86 COMMAND_LINE_SIZE, NUL included */

struct pvh_start_info {
    uint32_t magic, version, flags, nr_modules;
    uint64_t modlist_paddr, cmdline_paddr, rsdp_paddr;
    uint64_t memmap_paddr; /* version 1 */
    uint32_t memmap_entries, reserved;
};

struct pvh_module {
    uint64_t paddr, size, cmdline_paddr, reserved;
};

struct pvh_memmap_entry {
    uint64_t addr, size;
    uint32_t type, reserved;
};

static int fail(char *err, size_t errlen, const char *what) {
    snprintf(err, errlen, "%s", what);
    return -1;
}

static int read_header(int fd, Elf64_Ehdr *eh, char *err, size_t errlen) {
    if (read_exact(fd, eh, sizeof *eh, 0) < 0) return fail(err, errlen, "kernel: cannot read the ELF header");
    if (memcmp(eh->e_ident, ELFMAG, SELFMAG) || eh->e_ident[EI_CLASS] != ELFCLASS64 || eh->e_machine != EM_X86_64)
        return fail(err, errlen, "kernel: not an x86-64 ELF vmlinux (pass the uncompressed vmlinux, not a bzImage)");
    if (eh->e_phentsize != sizeof(Elf64_Phdr) || eh->e_phnum == 0 || eh->e_phnum > 64)
        return fail(err, errlen, "kernel: bad program header table");
    return 0;
}

/* Copies one PT_LOAD segment to its physical address; bytes past filesz stay zero (fresh anonymous RAM). */
static int load_segment(struct vm *vm, int fd, const Elf64_Phdr *ph, char *err, size_t errlen) {
    if (ph->p_filesz > ph->p_memsz) return fail(err, errlen, "kernel: segment file size exceeds its memory size");
    if (ph->p_paddr < HIGH_RAM_START) return fail(err, errlen, "kernel: segment below 1 MiB");
    uint8_t *dst = vm_guest_ptr(vm, ph->p_paddr, ph->p_memsz);
    if (!dst) return fail(err, errlen, "kernel: segment outside guest RAM (more --mem-mib?)");
    if (read_exact(fd, dst, ph->p_filesz, (off_t)ph->p_offset) < 0) return fail(err, errlen, "kernel: short segment");
    return 0;
}

/* Walks one PT_NOTE segment for the PVH entry note; 0 when not found. */
static uint32_t find_pvh_entry(int fd, const Elf64_Phdr *ph) {
    if (ph->p_filesz == 0 || ph->p_filesz > MAX_NOTES_BYTES) return 0;
    uint8_t *notes = malloc(ph->p_filesz);
    uint32_t entry = 0;
    if (!notes || read_exact(fd, notes, ph->p_filesz, (off_t)ph->p_offset) < 0) return free(notes), 0;
    for (uint64_t off = 0; off + sizeof(Elf64_Nhdr) <= ph->p_filesz;) {
        Elf64_Nhdr nh;
        memcpy(&nh, notes + off, sizeof nh);
        uint64_t name_off = off + sizeof nh, desc_off = name_off + ((nh.n_namesz + 3ull) & ~3ull);
        uint64_t next = desc_off + ((nh.n_descsz + 3ull) & ~3ull);
        if (next > ph->p_filesz) break;
        if (nh.n_type == PVH_NOTE_PHYS32_ENTRY && nh.n_namesz == 4 && !memcmp(notes + name_off, "Xen", 4) && nh.n_descsz >= 4)
            memcpy(&entry, notes + desc_off, 4);
        off = next;
    }
    free(notes);
    return entry;
}

/* Loads the kernel; returns the 32-bit PVH entry point, the end of the highest segment in *kernel_end. */
static int load_kernel(struct vm *vm, const char *path, uint32_t *entry, uint64_t *kernel_end, char *err, size_t errlen) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return snprintf(err, errlen, "kernel %s: %s", path, strerror(errno)), -1;
    Elf64_Ehdr eh;
    int r = read_header(fd, &eh, err, errlen);
    *entry = 0;
    *kernel_end = 0;
    for (int i = 0; r == 0 && i < eh.e_phnum; i++) {
        Elf64_Phdr ph;
        if (read_exact(fd, &ph, sizeof ph, (off_t)(eh.e_phoff + (uint64_t)i * sizeof ph)) < 0) {
            r = fail(err, errlen, "kernel: cannot read a program header");
            break;
        }
        if (ph.p_type == PT_LOAD && ph.p_memsz) {
            r = load_segment(vm, fd, &ph, err, errlen);
            if (ph.p_paddr + ph.p_memsz > *kernel_end) *kernel_end = ph.p_paddr + ph.p_memsz;
        } else if (ph.p_type == PT_NOTE && !*entry) {
            *entry = find_pvh_entry(fd, &ph);
        }
    }
    close(fd);
    if (r == 0 && !*entry) r = fail(err, errlen, "kernel: no PVH entry note (needs CONFIG_PVH=y)");
    if (r == 0 && !vm_guest_ptr(vm, *entry, 1)) r = fail(err, errlen, "kernel: PVH entry outside guest RAM");
    return r;
}

/* The initramfs goes at the top of RAM, page aligned, clear of the kernel. */
static int load_initramfs(struct vm *vm, const char *path, uint64_t kernel_end, struct pvh_module *mod, char *err,
                          size_t errlen) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return snprintf(err, errlen, "initramfs %s: %s", path, strerror(errno)), -1;
    struct stat st;
    int r = fstat(fd, &st);
    uint64_t size = r == 0 ? (uint64_t)st.st_size : 0;
    uint64_t gpa = size < vm->ram_size ? (vm->ram_size - size) & ~(PAGE - 1) : 0;
    if (r < 0 || size == 0) r = fail(err, errlen, "initramfs: empty or unreadable");
    else if (gpa < kernel_end) r = fail(err, errlen, "initramfs: does not fit above the kernel (more --mem-mib?)");
    else r = read_exact(fd, vm->ram + gpa, size, 0) < 0 ? fail(err, errlen, "initramfs: short read") : 0;
    close(fd);
    *mod = (struct pvh_module){.paddr = gpa, .size = size};
    return r;
}

/* RAM below the VGA hole and from 1 MiB to the end; everything above RAM (PCI MMIO, IOAPIC, LAPIC, MSI) is a hole. */
static uint32_t write_memmap(struct vm *vm) {
    struct pvh_memmap_entry map[] = {
        {.addr = 0, .size = LOW_RAM_END, .type = E820_RAM},
        {.addr = HIGH_RAM_START, .size = vm->ram_size - HIGH_RAM_START, .type = E820_RAM},
    };
    memcpy(vm->ram + MEMMAP_GPA, map, sizeof map);
    return sizeof map / sizeof map[0];
}

/* Flat 4 GiB segments, 32-bit protected mode, paging off: the state the PVH ABI promises at the entry. */
static int set_entry_state(struct vm *vm, uint32_t entry) {
    struct kvm_sregs sregs;
    if (ioctl(vm->vcpu_fd, KVM_GET_SREGS, &sregs) < 0) return -1;
    struct kvm_segment code = {.base = 0, .limit = 0xffffffff, .selector = 0x8, .type = 0xb, .present = 1, .db = 1, .s = 1, .g = 1};
    struct kvm_segment data = code;
    data.selector = 0x10;
    data.type = 0x3;
    sregs.cs = code;
    sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = data;
    sregs.tr = (struct kvm_segment){.selector = 0x18, .limit = 0x67, .type = 0xb, .present = 1};
    sregs.ldt = (struct kvm_segment){.limit = 0xffff, .type = 0x2, .present = 1};
    sregs.cr0 = 0x11; /* PE | ET */
    sregs.cr3 = sregs.cr4 = sregs.efer = 0;
    if (ioctl(vm->vcpu_fd, KVM_SET_SREGS, &sregs) < 0) return -1;
    struct kvm_regs regs = {.rip = entry, .rbx = START_INFO_GPA, .rflags = 0x2};
    return ioctl(vm->vcpu_fd, KVM_SET_REGS, &regs);
}

int pvh_boot_install(struct vm *vm, const struct pvh_boot *boot, char *err, size_t errlen) {
    if (vm->ram_size < (64ull << 20)) return fail(err, errlen, "a Linux guest needs at least 64 MiB");
    size_t cmdline_len = strlen(boot->cmdline);
    if (cmdline_len >= CMDLINE_MAX) return fail(err, errlen, "kernel command line longer than 2047 bytes");
    uint32_t entry;
    uint64_t kernel_end;
    struct pvh_module mod;
    if (load_kernel(vm, boot->kernel, &entry, &kernel_end, err, errlen) < 0) return -1;
    if (load_initramfs(vm, boot->initramfs, kernel_end, &mod, err, errlen) < 0) return -1;
    memcpy(vm->ram + CMDLINE_GPA, boot->cmdline, cmdline_len + 1);
    memcpy(vm->ram + MODLIST_GPA, &mod, sizeof mod);
    struct pvh_start_info info = {
        .magic = PVH_MAGIC, .version = 1, .nr_modules = 1, .modlist_paddr = MODLIST_GPA,
        .cmdline_paddr = CMDLINE_GPA, .rsdp_paddr = acpi_tables_install(vm), .memmap_paddr = MEMMAP_GPA, .memmap_entries = write_memmap(vm)};
    memcpy(vm->ram + START_INFO_GPA, &info, sizeof info);
    if (set_entry_state(vm, entry) < 0) return snprintf(err, errlen, "set entry registers: %s", strerror(errno)), -1;
    return 0;
}
