/*
 * Snapshots to disk and starts from them (docs/snapshots.md, "vmm engine").
 *
 * Writing: the control thread parks the vCPU, captures the state and forks
 * one writer child (fork.c), exactly as for a fork, then resumes at once. The
 * writer never runs the VM: it writes its copy-on-write view of guest RAM to
 * memory.raw (all-zero pages stay holes), the captured state to state.bin,
 * fsyncs, reports in DIR/done and exits. The parent's pause is a fork's pause.
 *
 * Starting: memory.raw is mapped MAP_PRIVATE at the guest-RAM address it was
 * taken at, so many VMs of one snapshot share its page cache and never write
 * the file. Device state is the memory image of struct board, which holds
 * pointers into guest RAM and into this binary's static data; that is why a
 * snapshot only starts in the very clade-vmm build that wrote it (GNU build
 * id in the header) and at the same RAM address (a static non-PIE binary,
 * MAP_FIXED_NOREPLACE). Every size, count and offset in state.bin is checked
 * before use.
 */
#include "vmm.h"

#include <elf.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <link.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#include <x86intrin.h>

#define PAGE 4096u
#define WRITE_CHUNK (1u << 20)
#define RAM_ALIGN (2u << 20)
#define HIGHEST_USER_ADDR (1ull << 47)
#define MSR_IA32_TSC 0x10u
#define MAX_XSAVE_BYTES (1u << 20)
#define HOST_DIFFERS                                                                                                       \
    "this host's KVM differs from the one the snapshot was taken on (XSAVE size, SREGS2, XCRS, debug registers or TSC "    \
    "offset control): take the snapshot again on this host"

/* ---- build id ------------------------------------------------------------- */

struct build_id {
    uint8_t bytes[SNAPSHOT_BUILD_ID_MAX];
    uint32_t len;
};

static int find_build_id(struct dl_phdr_info *info, size_t size, void *arg) {
    (void)size;
    struct build_id *id = arg;
    for (int i = 0; i < info->dlpi_phnum && !id->len; i++) {
        const ElfW(Phdr) *ph = &info->dlpi_phdr[i];
        if (ph->p_type != PT_NOTE) continue;
        const uint8_t *p = (const uint8_t *)(info->dlpi_addr + ph->p_vaddr), *end = p + ph->p_memsz;
        while (p + sizeof(ElfW(Nhdr)) <= end) {
            const ElfW(Nhdr) *note = (const void *)p;
            const uint8_t *name = p + sizeof *note, *desc = name + ((note->n_namesz + 3) & ~3u);
            if (desc + note->n_descsz > end) break;
            if (note->n_type == NT_GNU_BUILD_ID && note->n_namesz == 4 && !memcmp(name, "GNU", 4) &&
                note->n_descsz <= SNAPSHOT_BUILD_ID_MAX) {
                memcpy(id->bytes, desc, note->n_descsz);
                id->len = note->n_descsz;
                break;
            }
            p = desc + ((note->n_descsz + 3) & ~3u);
        }
    }
    return 1; /* the executable comes first; a static binary has nothing else */
}

/* The linker's hash of this binary: device-state images are only valid in the build that wrote them. */
static const struct build_id *own_build_id(void) {
    static struct build_id id;
    if (!id.len) dl_iterate_phdr(find_build_id, &id);
    return &id;
}

static void hex(char *out, const uint8_t *b, uint32_t n) {
    for (uint32_t i = 0; i < n; i++) sprintf(out + 2 * i, "%02x", b[i]);
    out[2 * n] = '\0';
}

/* ---- writing (the writer child) --------------------------------------------- */

static int page_is_zero(const uint8_t *p) {
    const uint64_t *w = (const void *)p;
    for (unsigned i = 0; i < PAGE / 8; i++)
        if (w[i]) return 0;
    return 1;
}

static int write_all_at(int fd, const uint8_t *p, size_t len, off_t at) {
    while (len) {
        ssize_t n = pwrite(fd, p, len, at);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) return -1;
        p += n, len -= (size_t)n, at += n;
    }
    return 0;
}

/* Guest RAM as a sparse file: runs of non-zero pages are written, all-zero pages stay holes. */
static int write_memory(const struct vm *vm, int dirfd, uint64_t *data_bytes) {
    int fd = openat(dirfd, "memory.raw", O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (fd < 0) return -1;
    uint64_t off = 0, run = 0;
    int r = 0;
    *data_bytes = 0;
    while (off < vm->ram_size && r == 0) {
        while (off + run < vm->ram_size && run < WRITE_CHUNK && !page_is_zero(vm->ram + off + run)) run += PAGE;
        if (run) r = write_all_at(fd, vm->ram + off, run, (off_t)off);
        *data_bytes += run;
        off += run ? run : PAGE;
        run = 0;
    }
    if (r == 0) r = ftruncate(fd, (off_t)vm->ram_size);
    if (r == 0) r = fsync(fd);
    close(fd);
    return r;
}

struct buffer {
    uint8_t *data;
    size_t used, cap;
};

static int put(struct buffer *b, const void *p, size_t n) {
    size_t padded = (n + 7) & ~(size_t)7;
    if (b->used + padded > b->cap) {
        size_t cap = (b->cap ? b->cap * 2 : 65536) + padded;
        uint8_t *d = realloc(b->data, cap);
        if (!d) return -1;
        b->data = d, b->cap = cap;
    }
    memcpy(b->data + b->used, p, n);
    memset(b->data + b->used + n, 0, padded - n);
    b->used += padded;
    return 0;
}

static int put_section(struct buffer *b, struct snapshot_header *h, uint32_t id, const void *p, size_t n) {
    struct snapshot_section s = {.id = id, .bytes = n};
    h->section_count++;
    return put(b, &s, sizeof s) < 0 ? -1 : put(b, p, n);
}

static void facts_of(const struct vmm *v, struct snapshot_vm_facts *f) {
    const struct vm *vm = &v->vm;
    memset(f, 0, sizeof *f);
    *f = (struct snapshot_vm_facts){.msr_count = vm->msr_count, .xsave_size = vm->xsave_size, .has_xsave2 = (uint32_t)vm->has_xsave2,
                                    .has_xcrs = (uint32_t)vm->has_xcrs, .has_sregs2 = (uint32_t)vm->has_sregs2,
                                    .has_tsc_offset_attr = (uint32_t)vm->has_tsc_offset_attr,
                                    .has_debugregs = (uint32_t)vm->has_debugregs, .guest_linux = v->board != NULL};
    memcpy(f->msr_index, vm->msr_index, sizeof f->msr_index);
}

static int encode_state(const struct vmm *v, struct buffer *b) {
    const struct build_id *id = own_build_id();
    struct snapshot_header h = {.format = SNAPSHOT_FORMAT, .header_bytes = sizeof h, .build_id_len = id->len,
                                .ram_size = v->vm.ram_size, .ram_host_addr = (uint64_t)(uintptr_t)v->vm.ram};
    memcpy(h.magic, SNAPSHOT_MAGIC, 8);
    memcpy(h.build_id, id->bytes, id->len);
    if (put(b, &h, sizeof h) < 0) return -1;
    struct snapshot_vm_facts facts;
    facts_of(v, &facts);
    struct vcpu_state vcpu = v->state.vcpu;
    vcpu.xsave = NULL, vcpu.msrs = NULL; /* host pointers: the loader keeps its own buffers */
    const struct kvm_cpuid2 *cpuid = v->vm.cpuid;
    int r = put_section(b, &h, SNAP_VM_FACTS, &facts, sizeof facts);
    r = r < 0 ? r : put_section(b, &h, SNAP_CPUID, cpuid->entries, cpuid->nent * sizeof cpuid->entries[0]);
    r = r < 0 ? r : put_section(b, &h, SNAP_VCPU, &vcpu, sizeof vcpu);
    r = r < 0 ? r : put_section(b, &h, SNAP_XSAVE, v->state.vcpu.xsave, v->vm.xsave_size);
    r = r < 0 ? r : put_section(b, &h, SNAP_MSRS, v->state.vcpu.msrs->entries, v->vm.msr_count * sizeof(struct kvm_msr_entry));
    r = r < 0 ? r : put_section(b, &h, SNAP_VM_STATE, &v->state.vm, sizeof v->state.vm);
    if (r == 0 && v->board) r = put_section(b, &h, SNAP_BOARD, v->board, sizeof *v->board);
    if (r < 0) return -1;
    h.total_bytes = b->used;
    memcpy(b->data, &h, sizeof h); /* now with the section count and total */
    return 0;
}

static int write_state(const struct vmm *v, int dirfd, uint64_t *bytes) {
    struct buffer b = {0};
    int r = encode_state(v, &b);
    int fd = r < 0 ? -1 : openat(dirfd, "state.bin", O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (fd >= 0) {
        r = write_all_at(fd, b.data, b.used, 0) < 0 || fsync(fd) < 0 ? -1 : 0;
        close(fd);
    } else r = -1;
    *bytes = b.used;
    free(b.data);
    return r;
}

/* The result the engine waits for: written under a temporary name and renamed, so it is never seen half-written. */
static void report_done(int dirfd, const char *json) {
    int fd = openat(dirfd, "done.tmp", O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0) return;
    int ok = write_all_at(fd, (const uint8_t *)json, strlen(json), 0) == 0 && fsync(fd) == 0;
    close(fd);
    if (ok) renameat(dirfd, "done.tmp", dirfd, "done");
    fsync(dirfd);
}

_Noreturn void snapshot_writer_main(const struct vmm *v, const char *dir) {
    int64_t t0 = now_ns();
    char json[512];
    uint64_t memory_data = 0, state_bytes = 0;
    int dirfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dirfd < 0) _exit(1); /* nowhere to report: the engine sees the writer gone without a result */
    const char *step = "memory.raw";
    int r = write_memory(&v->vm, dirfd, &memory_data);
    if (r == 0) step = "state.bin", r = write_state(v, dirfd, &state_bytes);
    if (r == 0) r = fsync(dirfd);
    if (r == 0)
        snprintf(json, sizeof json, "{\"ok\":true,\"memoryDataBytes\":%" PRIu64 ",\"stateBytes\":%" PRIu64 ",\"writeUs\":%.1f}\n",
                 memory_data, state_bytes, (now_ns() - t0) / 1e3);
    else snprintf(json, sizeof json, "{\"ok\":false,\"error\":\"cannot write %s: %s\"}\n", step, strerror(errno));
    report_done(dirfd, json);
    _exit(r == 0 ? 0 : 1);
}

/* ---- loading ------------------------------------------------------------------ */

struct loaded {
    const struct snapshot_header *h;
    const uint8_t *section[SNAP_BOARD + 1];
    uint64_t bytes[SNAP_BOARD + 1];
};

static int failf(char *err, size_t errlen, const char *what) {
    snprintf(err, errlen, "%s", what);
    return -1;
}

static uint8_t *read_state_file(int dirfd, size_t *len, char *err, size_t errlen) {
    int fd = openat(dirfd, "state.bin", O_RDONLY | O_CLOEXEC);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) < 0) {
        snprintf(err, errlen, "cannot open state.bin: %s", strerror(errno));
        if (fd >= 0) close(fd);
        return NULL;
    }
    uint8_t *buf = st.st_size >= (off_t)sizeof(struct snapshot_header) && st.st_size <= SNAPSHOT_STATE_MAX ? malloc((size_t)st.st_size) : NULL;
    int unreadable = !buf || read_exact(fd, buf, (size_t)st.st_size, 0) < 0;
    close(fd);
    if (unreadable) {
        free(buf);
        snprintf(err, errlen, "state.bin is unreadable or not a plausible size (%lld bytes)", (long long)st.st_size);
        return NULL;
    }
    *len = (size_t)st.st_size;
    return buf;
}

static int check_header(const struct snapshot_header *h, size_t len, char *err, size_t errlen) {
    if (memcmp(h->magic, SNAPSHOT_MAGIC, 8)) return failf(err, errlen, "state.bin is not a clade-vmm snapshot (bad magic)");
    if (h->format != SNAPSHOT_FORMAT || h->header_bytes != sizeof *h)
        return snprintf(err, errlen, "state.bin has format %u; this clade-vmm reads format %u", h->format, SNAPSHOT_FORMAT), -1;
    if (h->total_bytes != len) return failf(err, errlen, "state.bin is truncated or has trailing bytes");
    const struct build_id *own = own_build_id();
    if (h->build_id_len != own->len || memcmp(h->build_id, own->bytes, own->len)) {
        char theirs[2 * SNAPSHOT_BUILD_ID_MAX + 1], ours[2 * SNAPSHOT_BUILD_ID_MAX + 1];
        hex(theirs, h->build_id, h->build_id_len <= SNAPSHOT_BUILD_ID_MAX ? h->build_id_len : 0);
        hex(ours, own->bytes, own->len);
        snprintf(err, errlen, "snapshot was written by clade-vmm build %.16s, this is build %.16s: start it with the clade-vmm that took it, or take the snapshot again",
                 theirs, ours);
        return -1;
    }
    if (!h->ram_size || h->ram_size % RAM_ALIGN || h->ram_size > BOARD_MAX_RAM || !h->ram_host_addr || h->ram_host_addr % RAM_ALIGN ||
        h->ram_host_addr > HIGHEST_USER_ADDR - h->ram_size)
        return failf(err, errlen, "state.bin records an impossible guest RAM size or address");
    return 0;
}

/* Walks the section table; every section must lie inside the file, known ids at most once. */
static int index_sections(const uint8_t *buf, size_t len, struct loaded *l, char *err, size_t errlen) {
    size_t off = sizeof *l->h;
    for (uint32_t i = 0; i < l->h->section_count; i++) {
        struct snapshot_section s;
        if (len - off < sizeof s) return failf(err, errlen, "state.bin: section table runs past the end");
        memcpy(&s, buf + off, sizeof s);
        off += sizeof s;
        if (s.bytes > len - off) return failf(err, errlen, "state.bin: a section runs past the end");
        if (s.id < SNAP_VM_FACTS || s.id > SNAP_BOARD || l->section[s.id] || s.reserved)
            return snprintf(err, errlen, "state.bin: unexpected or repeated section %u", s.id), -1;
        l->section[s.id] = buf + off;
        l->bytes[s.id] = s.bytes;
        uint64_t padded = (s.bytes + 7) & ~7ull;
        off += padded <= len - off ? padded : len - off;
    }
    return off == len ? 0 : failf(err, errlen, "state.bin: bytes after the last section");
}

static int section_is(const struct loaded *l, int id, uint64_t bytes) {
    return l->section[id] && l->bytes[id] == bytes;
}

static int load_facts(struct vm *vm, const struct loaded *l, int *linux_guest, char *err, size_t errlen) {
    struct snapshot_vm_facts f;
    if (!section_is(l, SNAP_VM_FACTS, sizeof f)) return failf(err, errlen, "state.bin: VM facts missing or of the wrong size");
    memcpy(&f, l->section[SNAP_VM_FACTS], sizeof f);
    if (f.msr_count > VMM_MAX_MSRS || (f.xsave_size && (f.xsave_size < sizeof(struct kvm_xsave) || f.xsave_size > MAX_XSAVE_BYTES)) ||
        f.guest_linux > 1)
        return failf(err, errlen, "state.bin: VM facts out of range");
    uint64_t entry = sizeof vm->cpuid->entries[0], cpuid_bytes = l->bytes[SNAP_CPUID];
    if (!l->section[SNAP_CPUID] || cpuid_bytes % entry || cpuid_bytes / entry > VMM_MAX_CPUID_ENTRIES)
        return failf(err, errlen, "state.bin: CPUID missing or out of range");
    if ((int)f.has_sregs2 != vm->has_sregs2 || (int)f.has_xcrs != vm->has_xcrs || (int)f.has_debugregs != vm->has_debugregs)
        return failf(err, errlen, HOST_DIFFERS);
    vm->cpuid->nent = (uint32_t)(cpuid_bytes / entry); /* vm_open_kvm allocated VMM_MAX_CPUID_ENTRIES */
    memcpy(vm->cpuid->entries, l->section[SNAP_CPUID], cpuid_bytes);
    vm->msr_count = f.msr_count;
    memcpy(vm->msr_index, f.msr_index, sizeof vm->msr_index);
    vm->xsave_size = f.xsave_size;
    vm->has_xsave2 = (int)f.has_xsave2, vm->has_xcrs = (int)f.has_xcrs, vm->has_sregs2 = (int)f.has_sregs2;
    vm->has_tsc_offset_attr = (int)f.has_tsc_offset_attr, vm->has_debugregs = (int)f.has_debugregs;
    *linux_guest = (int)f.guest_linux;
    return 0;
}

/*
 * The guest TSC carries on from its value at capture: the host TSC of another
 * boot means nothing to it, so the offset is recomputed against the TSC now.
 * kvmclock moves on by the wall time since capture (KVM_CLOCK_REALTIME).
 */
static void rebase_tsc(struct machine_state *st, uint32_t msr_count) {
    uint64_t now = __rdtsc();
    for (uint32_t i = 0; i < msr_count; i++)
        if (st->vcpu.msrs->entries[i].index == MSR_IA32_TSC) st->vcpu.tsc_offset = st->vcpu.msrs->entries[i].data - now;
    st->vcpu.host_tsc = now;
}

static int load_state(struct vmm *v, const struct loaded *l, char *err, size_t errlen) {
    struct machine_state *st = &v->state;
    if (state_alloc(&v->vm, st) < 0) return failf(err, errlen, "out of memory");
    struct kvm_xsave *xsave = st->vcpu.xsave;
    struct kvm_msrs *msrs = st->vcpu.msrs;
    if (!section_is(l, SNAP_VCPU, sizeof st->vcpu) || !section_is(l, SNAP_XSAVE, v->vm.xsave_size) ||
        !section_is(l, SNAP_MSRS, v->vm.msr_count * sizeof(struct kvm_msr_entry)) || !section_is(l, SNAP_VM_STATE, sizeof st->vm))
        return failf(err, errlen, "state.bin: vCPU or VM state missing or of the wrong size");
    memcpy(&st->vcpu, l->section[SNAP_VCPU], sizeof st->vcpu);
    st->vcpu.xsave = xsave, st->vcpu.msrs = msrs; /* this process's buffers, not the recorded pointers */
    if (xsave) memcpy(xsave, l->section[SNAP_XSAVE], v->vm.xsave_size);
    msrs->nmsrs = v->vm.msr_count;
    memcpy(msrs->entries, l->section[SNAP_MSRS], v->vm.msr_count * sizeof(struct kvm_msr_entry));
    memcpy(&st->vm, l->section[SNAP_VM_STATE], sizeof st->vm);
    rebase_tsc(st, v->vm.msr_count);
    return 0;
}

/* Private and copy-on-write: guest writes go to anonymous pages of this process, never to the file. */
static int map_memory(struct vm *vm, int dirfd, const struct snapshot_header *h, char *err, size_t errlen) {
    int fd = openat(dirfd, "memory.raw", O_RDONLY | O_CLOEXEC);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) < 0 || (uint64_t)st.st_size != h->ram_size) {
        snprintf(err, errlen, "memory.raw is missing or not %" PRIu64 " bytes", h->ram_size);
        if (fd >= 0) close(fd);
        return -1;
    }
    void *want = (void *)(uintptr_t)h->ram_host_addr;
    void *got = mmap(want, h->ram_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_FIXED_NOREPLACE | MAP_NORESERVE, fd, 0);
    close(fd); /* the mapping keeps the file */
    if (got == MAP_FAILED || got != want) {
        if (got != MAP_FAILED) munmap(got, h->ram_size);
        snprintf(err, errlen, "cannot map guest RAM at %p where the snapshot had it: %s", want, strerror(errno));
        return -1;
    }
    vm->ram = got;
    vm->ram_size = h->ram_size;
    return 0;
}

int snapshot_load(struct vmm *v, const char *dir, void **board_image, char *err, size_t errlen) {
    *board_image = NULL;
    int dirfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dirfd < 0) return snprintf(err, errlen, "cannot open snapshot directory %s: %s", dir, strerror(errno)), -1;
    size_t len = 0;
    uint8_t *buf = read_state_file(dirfd, &len, err, errlen);
    struct loaded l = {.h = (const void *)buf};
    int linux_guest = 0;
    int r = buf ? 0 : -1;
    r = r < 0 ? r : check_header(l.h, len, err, errlen);
    r = r < 0 ? r : index_sections(buf, len, &l, err, errlen);
    r = r < 0 ? r : load_facts(&v->vm, &l, &linux_guest, err, errlen);
    r = r < 0 ? r : load_state(v, &l, err, errlen);
    if (r == 0 && linux_guest != !!l.section[SNAP_BOARD]) r = failf(err, errlen, "state.bin: device state does not match the guest kind");
    if (r == 0 && linux_guest && !section_is(&l, SNAP_BOARD, sizeof(struct board))) r = failf(err, errlen, "state.bin: device state of the wrong size");
    if (r == 0 && linux_guest && !(*board_image = malloc(sizeof(struct board)))) r = failf(err, errlen, "out of memory");
    if (r == 0 && linux_guest) memcpy(*board_image, l.section[SNAP_BOARD], sizeof(struct board));
    r = r < 0 ? r : map_memory(&v->vm, dirfd, l.h, err, errlen);
    if (r < 0) free(*board_image), *board_image = NULL;
    free(buf);
    close(dirfd);
    return r;
}

int snapshot_check_host(const struct vm *vm, char *err, size_t errlen) {
    struct vm here = *vm;
    vm_learn_features(&here);
    if (here.xsave_size != vm->xsave_size || here.has_xsave2 != vm->has_xsave2 || here.has_tsc_offset_attr != vm->has_tsc_offset_attr)
        return failf(err, errlen, HOST_DIFFERS);
    return 0;
}
