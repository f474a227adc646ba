/*
 * Snapshots to disk and starts from them (docs/snapshots.md, "vmm engine").
 *
 * Writing: the control thread parks the vCPU, captures the state and forks
 * one writer child (fork.c), exactly as for a fork, then resumes at once. The
 * writer never runs the VM: it writes its copy-on-write view of guest RAM to
 * memory.raw (all-zero pages stay holes), the captured state to state.bin
 * (snapshot_format.c: plain data only), fsyncs, reports in DIR/done and exits.
 * The parent's pause is a fork's pause.
 *
 * Starting: memory.raw is mapped MAP_PRIVATE, so many VMs of one snapshot
 * share its page cache and never write the file. state.bin is decoded and
 * checked completely before anything of it is used; the devices are built
 * fresh and take only checked plain values from it (board_restore).
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
#define MSR_IA32_TSC 0x10u
#define RAM_ALIGN (2u << 20)
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

/* The linker's hash of this binary, recorded in state.bin to tell which build wrote a snapshot. */
static const struct build_id *own_build_id(void) {
    static struct build_id id;
    if (!id.len) dl_iterate_phdr(find_build_id, &id);
    return &id;
}

/* ---- writing (the writer child) --------------------------------------------- */

static int page_is_zero(const uint8_t *p) {
    const uint64_t *w = (const void *)p;
    for (unsigned i = 0; i < PAGE / 8; i++)
        if (w[i]) return 0;
    return 1;
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

static void facts_of(const struct vmm *v, struct snapshot_vm_facts *f) {
    const struct vm *vm = &v->vm;
    memset(f, 0, sizeof *f);
    *f = (struct snapshot_vm_facts){.msr_count = vm->msr_count, .xsave_size = vm->xsave_size, .has_xsave2 = (uint32_t)vm->has_xsave2,
                                    .has_xcrs = (uint32_t)vm->has_xcrs, .has_sregs2 = (uint32_t)vm->has_sregs2,
                                    .has_tsc_offset_attr = (uint32_t)vm->has_tsc_offset_attr,
                                    .has_debugregs = (uint32_t)vm->has_debugregs, .guest_linux = v->board != NULL};
    memcpy(f->msr_index, vm->msr_index, vm->msr_count * sizeof f->msr_index[0]);
}

/* The writer's view of the machine as plain data: KVM's structs, and the devices' saved state. */
static struct snapshot_image *image_of(const struct vmm *v) {
    struct snapshot_image *img = calloc(1, sizeof *img);
    if (!img) return NULL;
    const struct build_id *id = own_build_id();
    img->ram_size = v->vm.ram_size;
    img->build_id_len = id->len;
    memcpy(img->build_id, id->bytes, id->len);
    facts_of(v, &img->facts);
    img->cpuid_count = v->vm.cpuid->nent;
    memcpy(img->cpuid, v->vm.cpuid->entries, img->cpuid_count * sizeof img->cpuid[0]);
    img->vcpu = v->state.vcpu;
    img->xsave = (const uint8_t *)v->state.xsave;
    memcpy(img->msrs, v->state.msrs->entries, v->vm.msr_count * sizeof img->msrs[0]);
    img->vm = v->state.vm;
    img->has_board = v->board != NULL;
    if (v->board) board_save(v->board, &img->board);
    return img;
}

static int write_state(const struct vmm *v, int dirfd, uint64_t *bytes) {
    struct snapshot_image *img = image_of(v);
    uint8_t *data = NULL;
    size_t len = 0;
    int r = img && snapshot_encode(img, &data, &len) == 0 ? 0 : (errno = ENOMEM, -1);
    free(img);
    int fd = r < 0 ? -1 : openat(dirfd, "state.bin", O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (fd >= 0) {
        r = write_all_at(fd, data, len, 0) < 0 || fsync(fd) < 0 ? -1 : 0;
        close(fd);
    } else r = -1;
    *bytes = len;
    free(data);
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

/* The whole of state.bin, read from its descriptor; it must be a regular file of a plausible size. */
static uint8_t *read_state_file(int fd, size_t *len, char *err, size_t errlen) {
    struct stat st;
    if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode)) {
        snprintf(err, errlen, "state.bin is not a regular file");
        return NULL;
    }
    uint8_t *buf = st.st_size > 0 && st.st_size <= SNAPSHOT_STATE_MAX ? malloc((size_t)st.st_size) : NULL;
    if (!buf || read_exact(fd, buf, (size_t)st.st_size, 0) < 0) {
        free(buf);
        snprintf(err, errlen, "state.bin is unreadable or not a plausible size (%lld bytes)", (long long)st.st_size);
        return NULL;
    }
    *len = (size_t)st.st_size;
    return buf;
}

/* The snapshot's facts become this VM's; those the host decides must be this host's too. */
static int load_facts(struct vm *vm, const struct snapshot_image *img, char *err, size_t errlen) {
    const struct snapshot_vm_facts *f = &img->facts;
    if ((int)f->has_sregs2 != vm->has_sregs2 || (int)f->has_xcrs != vm->has_xcrs || (int)f->has_debugregs != vm->has_debugregs)
        return snprintf(err, errlen, HOST_DIFFERS), VMM_EXIT_SNAPSHOT_FOREIGN;
    vm->cpuid->nent = img->cpuid_count; /* vm_open_kvm allocated VMM_MAX_CPUID_ENTRIES */
    memcpy(vm->cpuid->entries, img->cpuid, img->cpuid_count * sizeof img->cpuid[0]);
    vm->msr_count = f->msr_count;
    memcpy(vm->msr_index, f->msr_index, sizeof vm->msr_index);
    vm->xsave_size = f->xsave_size;
    vm->has_xsave2 = (int)f->has_xsave2, vm->has_xcrs = (int)f->has_xcrs, vm->has_sregs2 = (int)f->has_sregs2;
    vm->has_tsc_offset_attr = (int)f->has_tsc_offset_attr, vm->has_debugregs = (int)f->has_debugregs;
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
        if (st->msrs->entries[i].index == MSR_IA32_TSC) st->vcpu.tsc_offset = st->msrs->entries[i].data - now;
    st->vcpu.host_tsc = now;
}

static int load_state(struct vmm *v, const struct snapshot_image *img, char *err, size_t errlen) {
    struct machine_state *st = &v->state;
    if (state_alloc(&v->vm, st) < 0) return snprintf(err, errlen, "out of memory"), VMM_EXIT_FAILURE;
    st->vcpu = img->vcpu;
    if (st->xsave) memcpy(st->xsave, img->xsave, v->vm.xsave_size);
    st->msrs->nmsrs = v->vm.msr_count;
    memcpy(st->msrs->entries, img->msrs, v->vm.msr_count * sizeof img->msrs[0]);
    st->vm = img->vm;
    rebase_tsc(st, v->vm.msr_count);
    return 0;
}

/* Private and copy-on-write: guest writes go to anonymous pages of this process, never to the file. */
static int map_memory(struct vm *vm, int fd, uint64_t ram_size, char *err, size_t errlen) {
    struct stat st;
    if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode) || (uint64_t)st.st_size != ram_size) {
        snprintf(err, errlen, "memory.raw is not a regular file of %" PRIu64 " bytes, as state.bin records", ram_size);
        return VMM_EXIT_SNAPSHOT_REFUSED;
    }
    /* 2 MiB aligned, as fresh guest RAM is: the guest's private copies can then be huge pages, which keeps forks cheap. */
    size_t span = (size_t)ram_size + RAM_ALIGN;
    uint8_t *raw = mmap(NULL, span, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (raw == MAP_FAILED) return snprintf(err, errlen, "cannot reserve guest RAM: %s", strerror(errno)), VMM_EXIT_FAILURE;
    uint8_t *aligned = (uint8_t *)(((uintptr_t)raw + RAM_ALIGN - 1) & ~(uintptr_t)(RAM_ALIGN - 1));
    void *got = mmap(aligned, ram_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_FIXED | MAP_NORESERVE, fd, 0);
    if (got == MAP_FAILED) {
        munmap(raw, span);
        return snprintf(err, errlen, "cannot map memory.raw: %s", strerror(errno)), VMM_EXIT_FAILURE;
    }
    if (aligned > raw) munmap(raw, (size_t)(aligned - raw));
    if (aligned + ram_size < raw + span) munmap(aligned + ram_size, (size_t)(raw + span - (aligned + ram_size)));
    madvise(got, ram_size, MADV_HUGEPAGE);
    vm->ram = got;
    vm->ram_size = ram_size;
    return 0;
}

int snapshot_load(struct vmm *v, int mem_fd, int state_fd, struct board_state **board, char *err, size_t errlen) {
    *board = NULL;
    size_t len = 0;
    uint8_t *buf = read_state_file(state_fd, &len, err, errlen);
    struct snapshot_image *img = buf ? malloc(sizeof *img) : NULL;
    int r = !buf ? VMM_EXIT_SNAPSHOT_REFUSED : !img ? (snprintf(err, errlen, "out of memory"), VMM_EXIT_FAILURE) : 0;
    if (r == 0 && snapshot_decode(buf, len, img, err, errlen) < 0) r = VMM_EXIT_SNAPSHOT_REFUSED;
    if (r == 0) r = load_facts(&v->vm, img, err, errlen);
    if (r == 0) r = load_state(v, img, err, errlen);
    if (r == 0 && img->has_board && !(*board = malloc(sizeof **board))) r = (snprintf(err, errlen, "out of memory"), VMM_EXIT_FAILURE);
    if (r == 0 && img->has_board) **board = img->board;
    if (r == 0) r = map_memory(&v->vm, mem_fd, img->ram_size, err, errlen);
    if (r != 0) free(*board), *board = NULL;
    free(img);
    free(buf);
    close(mem_fd); /* the mapping keeps the file */
    close(state_fd);
    return r;
}

int snapshot_check_host(const struct vm *vm, char *err, size_t errlen) {
    struct vm here = *vm;
    vm_learn_features(&here);
    if (here.xsave_size != vm->xsave_size || here.has_xsave2 != vm->has_xsave2 || here.has_tsc_offset_attr != vm->has_tsc_offset_attr)
        return snprintf(err, errlen, HOST_DIFFERS), -1;
    return 0;
}
