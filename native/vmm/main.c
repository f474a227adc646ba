/*
 * clade-vmm entry point.
 *
 *   clade-vmm run --socket PATH [--mem-mib N] [--idle-us N]
 *   clade-vmm run --socket PATH --kernel VMLINUX --initramfs FILE [--cmdline TEXT]
 *                 [--serial-log FILE] [--agent-socket PATH] [--mem-mib N]
 *   clade-vmm run --socket PATH --restore DIR [--serial-log FILE] [--agent-socket PATH] [--idle-us N]
 *
 * Starts one VM, running the CPL3 test guest or (with --kernel) a Linux
 * guest booted by PVH, and serves the control protocol (docs/vmm.md) on
 * PATH. Prints one JSON line on stdout once it accepts requests. Every
 * forked child is a process of its own with its own sockets.
 */
#include "vmm.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define DEFAULT_MEM_MIB 64
#define MAX_MEM_MIB 1024 /* the test guest's page tables map at most 1 GiB */
#define DEFAULT_LINUX_MEM_MIB 512
#define DEFAULT_IDLE_US 10000
#define DEFAULT_CMDLINE "console=ttyS0 panic=-1"
#define CPUID_HYPERVISOR_BIT (1u << 31)

struct options {
    const char *socket_path;
    uint64_t mem_mib;
    uint64_t idle_us;
    const char *kernel, *initramfs, *cmdline, *serial_log, *agent_socket, *restore;
};

/* At a fixed address (static, non-PIE): a snapshot's device state points into it, so a start from that snapshot finds it in the same place. */
static struct board linux_board;

int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

int read_exact(int fd, void *buf, size_t len, off_t off) {
    uint8_t *p = buf;
    while (len) {
        ssize_t n = pread(fd, p, len, off);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) return -1;
        p += n, len -= (size_t)n, off += n;
    }
    return 0;
}

/*
 * The UART writes to the log from the vCPU thread with the device lock held:
 * if the log is a pipe or a FIFO nobody drains, a blocking write would stall
 * the guest and the control thread with it. Non-blocking, a full log loses
 * bytes instead, like a serial cable nobody reads.
 */
int serial_log_open(const char *path) {
    int fd = open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
    if (fd >= 0) fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
    return fd;
}

static int usage(void) {
    fprintf(stderr, "usage: clade-vmm run --socket PATH [--mem-mib N] [--idle-us N]\n"
                    "       clade-vmm run --socket PATH --kernel VMLINUX --initramfs FILE [--cmdline TEXT]\n"
                    "                     [--serial-log FILE] [--agent-socket PATH] [--mem-mib N]\n"
                    "       clade-vmm run --socket PATH --restore DIR [--serial-log FILE] [--agent-socket PATH] [--idle-us N]\n");
    return 2;
}

static int parse_number(const char *s, uint64_t lo, uint64_t hi, uint64_t *out) {
    char *end;
    errno = 0;
    unsigned long long v = s ? strtoull(s, &end, 10) : 0;
    if (!s || errno || *end || v < lo || v > hi) return -1;
    *out = v;
    return 0;
}

static const char **string_option(struct options *o, const char *name) {
    if (!strcmp(name, "--socket")) return &o->socket_path;
    if (!strcmp(name, "--kernel")) return &o->kernel;
    if (!strcmp(name, "--initramfs")) return &o->initramfs;
    if (!strcmp(name, "--cmdline")) return &o->cmdline;
    if (!strcmp(name, "--serial-log")) return &o->serial_log;
    if (!strcmp(name, "--agent-socket")) return &o->agent_socket;
    if (!strcmp(name, "--restore")) return &o->restore;
    return NULL;
}

static int parse_options(int argc, char **argv, struct options *o) {
    *o = (struct options){.idle_us = DEFAULT_IDLE_US, .cmdline = DEFAULT_CMDLINE};
    if (argc < 2 || strcmp(argv[1], "run")) return -1;
    for (int i = 2; i < argc; i++) {
        const char *value = i + 1 < argc ? argv[i + 1] : NULL;
        const char **str = string_option(o, argv[i]);
        if (str && value) *str = value;
        else if (!strcmp(argv[i], "--mem-mib")) {
            if (parse_number(value, 2, BOARD_MAX_RAM >> 20, &o->mem_mib) < 0) return -1;
        } else if (!strcmp(argv[i], "--idle-us")) {
            if (parse_number(value, 0, 1000000, &o->idle_us) < 0) return -1;
        } else return -1;
        i++;
    }
    if (o->restore) return o->socket_path && !o->kernel && !o->initramfs && !o->mem_mib ? 0 : -1; /* the snapshot has them */
    if (!o->mem_mib) o->mem_mib = o->kernel ? DEFAULT_LINUX_MEM_MIB : DEFAULT_MEM_MIB;
    if (!o->kernel && (o->mem_mib > MAX_MEM_MIB || o->initramfs || o->serial_log || o->agent_socket)) return -1;
    if (o->kernel && !o->initramfs) return -1;
    return o->socket_path ? 0 : -1;
}

static int fail(const char *what) {
    fprintf(stderr, "clade-vmm: %s: %s\n", what, strerror(errno));
    return 1;
}

/* Linux looks for KVM's paravirtual leaves (kvmclock) only when CPUID says it runs on a hypervisor. */
static void mark_hypervisor_present(struct kvm_cpuid2 *cpuid) {
    for (uint32_t i = 0; i < cpuid->nent; i++)
        if (cpuid->entries[i].function == 1) cpuid->entries[i].ecx |= CPUID_HYPERVISOR_BIT;
}

/* The host ends of a Linux guest's devices: the serial log and the agent's listening socket. */
static int open_host_ends(const struct options *o, int *serial_fd, int *agent_fd) {
    *serial_fd = o->serial_log ? serial_log_open(o->serial_log) : -1;
    if (o->serial_log && *serial_fd < 0) return fail("open serial log");
    *agent_fd = -1;
    if (o->agent_socket && control_listen(o->agent_socket, agent_fd) < 0) return fail("listen on agent socket");
    return 0;
}

static int install_linux(struct vmm *v, const struct options *o) {
    struct board *board = &linux_board;
    /* The board's PCI bus 0 has no ACPI root-bridge object: the kernel finds it by the peer-bus scan. */
    static char cmdline[2048];
    if ((size_t)snprintf(cmdline, sizeof cmdline, "%s pci=lastbus=1", o->cmdline) >= sizeof cmdline)
        return fprintf(stderr, "clade-vmm: command line too long\n"), 1;
    struct pvh_boot boot = {.kernel = o->kernel, .initramfs = o->initramfs, .cmdline = cmdline};
    char err[256];
    if (pvh_boot_install(&v->vm, &boot, err, sizeof err) < 0) return fprintf(stderr, "clade-vmm: %s\n", err), 1;
    int serial_fd, agent_fd;
    if (open_host_ends(o, &serial_fd, &agent_fd)) return 1;
    if (board_init(board, &v->vm, serial_fd, agent_fd, o->agent_socket) < 0) return fail("devices");
    v->board = v->cpu.board = board;
    v->exit_on_stop = 1;
    return 0;
}

/* The root VM: everything a child later inherits is learned here, once. */
static int build_root_vm(struct vmm *v, const struct options *o) {
    if (vm_open(&v->vm, o->mem_mib << 20) < 0) return fail("open /dev/kvm and guest RAM");
    if (o->kernel) mark_hypervisor_present(v->vm.cpuid);
    if (vm_build_kvm_objects(&v->vm) < 0) return fail("create VM");
    vm_learn_features(&v->vm);
    if (vm_probe_msrs(&v->vm) < 0) return fail("list MSRs");
    if (o->kernel ? install_linux(v, o) : cpl3_guest_install(&v->vm) < 0) return o->kernel ? 1 : fail("install CPL3 test guest");
    if (state_alloc(&v->vm, &v->state) < 0) return fail("allocate state buffers");
    return 0;
}

static int restore_failed(const char *what) {
    fprintf(stderr, "clade-vmm: cannot start from snapshot: %s\n", what);
    return 1;
}

/*
 * A root VM started from a snapshot (snapshot.c): guest RAM is the snapshot's
 * memory.raw mapped copy-on-write, the state is restored with the same code
 * as a forked child's, and the device state gets this process's host ends.
 */
static int restore_root_vm(struct vmm *v, const struct options *o) {
    char err[300];
    void *board_image = NULL;
    v->cpu.timing.fork_ns = now_ns(); /* status: a restored root's time zero is the start of its restore */
    if (vm_open_kvm(&v->vm) < 0) return fail("open /dev/kvm");
    if (snapshot_load(v, o->restore, &board_image, err, sizeof err) < 0) return restore_failed(err);
    int r = 1;
    const char *failed = "vm";
    if (vm_build_kvm_objects(&v->vm) < 0) fail("create VM");
    else if (snapshot_check_host(&v->vm, err, sizeof err) < 0) restore_failed(err);
    else if ((v->cpu.timing.built_ns = now_ns(), state_restore(&v->vm, &v->state, &failed)) < 0) fail(failed);
    else r = 0;
    if (r == 0 && board_image) {
        int serial_fd, agent_fd;
        if (open_host_ends(o, &serial_fd, &agent_fd)) r = 1;
        else if (board_restore(&linux_board, board_image, &v->vm, agent_fd, o->agent_socket, serial_fd) < 0) {
            r = restore_failed("the device state does not fit this clade-vmm build");
            if (o->agent_socket) unlink(o->agent_socket);
        } else {
            v->board = v->cpu.board = &linux_board;
            v->exit_on_stop = 1;
        }
    }
    v->cpu.timing.restored_ns = now_ns();
    free(board_image);
    return r;
}

int main(int argc, char **argv) {
    struct options o;
    if (parse_options(argc, argv, &o) < 0) return usage();
    /* Children are reaped by the kernel (no zombies); a dead parent's children are adopted by init. */
    signal(SIGCHLD, SIG_IGN);
    signal(SIGPIPE, SIG_IGN);
    static struct vmm v;
    v.cpu.vm = &v.vm;
    v.cpu.idle_us = (uint32_t)o.idle_us;
    if (o.restore ? restore_root_vm(&v, &o) : build_root_vm(&v, &o)) return 1;
    int listen_fd;
    if (control_listen(o.socket_path, &listen_fd) < 0) {
        if (o.agent_socket) unlink(o.agent_socket);
        return fail("listen on control socket");
    }
    if (control_init(&v.ctl, listen_fd, o.socket_path) < 0) return fail("control channel");
    if (vcpu_init_sync(&v.cpu) < 0 || vcpu_start(&v.cpu) < 0) return unlink(o.socket_path), fail("start vCPU");
    printf("{\"ready\":true,\"pid\":%d,\"socket\":\"%s\",\"agentSocket\":\"%s\",\"msrs\":%u,\"xsaveBytes\":%u,\"xsave2\":%s,\"sregs2\":%s,"
           "\"tscOffsetAttr\":%s}\n",
           (int)getpid(), o.socket_path, o.agent_socket ? o.agent_socket : "", v.vm.msr_count, v.vm.xsave_size, v.vm.has_xsave2 ? "true" : "false",
           v.vm.has_sregs2 ? "true" : "false", v.vm.has_tsc_offset_attr ? "true" : "false");
    fflush(stdout);
    return control_serve(&v);
}
