/*
 * clade-vmm entry point.
 *
 *   clade-vmm run --socket PATH [--mem-mib N] [--idle-us N]
 *   clade-vmm run --socket PATH --kernel VMLINUX --initramfs FILE [--cmdline TEXT | --cmdline-fd FD]
 *                 [--serial-log FILE [--serial-log-max BYTES]] [--agent-socket PATH] [--mem-mib N] [--disk FILE]
 *                 [--net SOCKET]
 *   clade-vmm run --socket PATH (--restore DIR | --restore-fds MEM_FD,STATE_FD)
 *                 [--serial-log FILE [--serial-log-max BYTES]] [--agent-socket PATH] [--idle-us N] [--net SOCKET]
 *
 * Starts one VM, running the CPL3 test guest or (with --kernel) a Linux
 * guest booted by PVH, and serves the control protocol (docs/vmm.md) on
 * PATH. Prints one JSON line on stdout once it accepts requests. Every
 * forked child is a process of its own with its own sockets.
 *
 * --disk FILE gives a Linux guest a read-only virtio-blk disk (/dev/vda)
 * backed by FILE, opened read-only; forked children share it. A snapshot
 * records the file's absolute path and size, and a restore opens that path
 * again, refusing a file of another size.
 *
 * --net SOCKET gives a Linux guest a virtio-net NIC (eth0, MAC
 * 52:54:00:c1:ad:0f) whose frames go over the unix stream socket SOCKET
 * (an absolute path; QEMU's stream-netdev framing), connected before any VM
 * is made. A forked child connects to RUN_DIR/net.sock instead. A snapshot
 * records whether the VM had a NIC: restoring one needs --net, restoring
 * one without refuses it.
 *
 * Nothing secret belongs on the command line (every local user can read
 * it): a kernel command line holding a token comes through --cmdline-fd.
 */
#include "vmm.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define DEFAULT_MEM_MIB 64
#define MAX_MEM_MIB 1024 /* the test guest's page tables map at most 1 GiB */
#define DEFAULT_LINUX_MEM_MIB 512
#define DEFAULT_IDLE_US 10000
#define DEFAULT_CMDLINE "console=ttyS0 panic=-1"
#define CPUID_HYPERVISOR_BIT (1u << 31)
#define CMDLINE_MAX 2048

struct options {
    const char *socket_path;
    uint64_t mem_mib;
    uint64_t idle_us;
    uint64_t serial_log_max;
    int cmdline_fd;              /* -1: none */
    int restore_fds[2];          /* memory.raw, state.bin; -1: none */
    const char *kernel, *initramfs, *cmdline, *serial_log, *agent_socket, *restore, *disk, *net;
};

static struct board linux_board;
static struct cpl3_guest test_guest;

static int usage(void) {
    fprintf(stderr, "usage: clade-vmm run --socket PATH [--mem-mib N] [--idle-us N]\n"
                    "       clade-vmm run --socket PATH --kernel VMLINUX --initramfs FILE [--cmdline TEXT | --cmdline-fd FD]\n"
                    "                     [--serial-log FILE [--serial-log-max BYTES]] [--agent-socket PATH] [--mem-mib N] [--disk FILE]\n"
                    "                     [--net SOCKET]\n"
                    "       clade-vmm run --socket PATH (--restore DIR | --restore-fds MEM_FD,STATE_FD)\n"
                    "                     [--serial-log FILE [--serial-log-max BYTES]] [--agent-socket PATH] [--idle-us N] [--net SOCKET]\n"
                    "  --net SOCKET: a virtio-net NIC over that unix stream socket (absolute path; Linux guests only)\n");
    return VMM_EXIT_USAGE;
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
    if (!strcmp(name, "--disk")) return &o->disk;
    if (!strcmp(name, "--net")) return &o->net;
    return NULL;
}

/* An inherited descriptor number: 3 and up (0-2 are stdio). */
static int parse_fd(const char *s, int *fd) {
    uint64_t v;
    if (parse_number(s, 3, 1 << 20, &v) < 0) return -1;
    *fd = (int)v;
    return 0;
}

static int parse_fd_pair(const char *s, int fds[2]) {
    const char *comma = s ? strchr(s, ',') : NULL;
    char first[16];
    if (!comma || (size_t)(comma - s) >= sizeof first) return -1;
    memcpy(first, s, (size_t)(comma - s));
    first[comma - s] = '\0';
    return parse_fd(first, &fds[0]) < 0 || parse_fd(comma + 1, &fds[1]) < 0 || fds[0] == fds[1] ? -1 : 0;
}

static int parse_options(int argc, char **argv, struct options *o) {
    *o = (struct options){.idle_us = DEFAULT_IDLE_US, .serial_log_max = SERIAL_LOG_DEFAULT_MAX, .cmdline_fd = -1,
                          .restore_fds = {-1, -1}};
    if (argc < 2 || strcmp(argv[1], "run")) return -1;
    for (int i = 2; i < argc; i++) {
        const char *value = i + 1 < argc ? argv[i + 1] : NULL;
        const char **str = string_option(o, argv[i]);
        if (str && value) *str = value;
        else if (!strcmp(argv[i], "--mem-mib")) {
            if (parse_number(value, 2, BOARD_MAX_RAM >> 20, &o->mem_mib) < 0) return -1;
        } else if (!strcmp(argv[i], "--idle-us")) {
            if (parse_number(value, 0, 1000000, &o->idle_us) < 0) return -1;
        } else if (!strcmp(argv[i], "--serial-log-max")) {
            if (parse_number(value, 4096, 1ull << 40, &o->serial_log_max) < 0) return -1;
        } else if (!strcmp(argv[i], "--cmdline-fd")) {
            if (parse_fd(value, &o->cmdline_fd) < 0) return -1;
        } else if (!strcmp(argv[i], "--restore-fds")) {
            if (parse_fd_pair(value, o->restore_fds) < 0) return -1;
        } else return -1;
        i++;
    }
    bool restoring = o->restore || o->restore_fds[0] >= 0;
    if (o->restore && o->restore_fds[0] >= 0) return -1;
    if (o->cmdline && o->cmdline_fd >= 0) return -1;
    if (restoring) /* the snapshot has them, the disk's path included */
        return o->socket_path && !o->kernel && !o->initramfs && !o->mem_mib && !o->cmdline && o->cmdline_fd < 0 && !o->disk ? 0 : -1;
    if (!o->mem_mib) o->mem_mib = o->kernel ? DEFAULT_LINUX_MEM_MIB : DEFAULT_MEM_MIB;
    if (!o->kernel && (o->mem_mib > MAX_MEM_MIB || o->initramfs || o->serial_log || o->agent_socket || o->cmdline || o->cmdline_fd >= 0 ||
                       o->disk || o->net))
        return -1;
    if (o->kernel && !o->initramfs) return -1;
    return o->socket_path ? 0 : -1;
}

static int fail(const char *what) {
    fprintf(stderr, "clade-vmm: %s: %s\n", what, strerror(errno));
    return VMM_EXIT_FAILURE;
}

/* Linux looks for KVM's paravirtual leaves (kvmclock) only when CPUID says it runs on a hypervisor. */
static void mark_hypervisor_present(struct kvm_cpuid2 *cpuid) {
    for (uint32_t i = 0; i < cpuid->nent; i++)
        if (cpuid->entries[i].function == 1) cpuid->entries[i].ecx |= CPUID_HYPERVISOR_BIT;
}

/* The host ends of a Linux guest's devices: the serial log and the agent's listening socket. */
static int open_host_ends(const struct options *o, struct serial_log *serial, int *agent_fd) {
    serial_log_none(serial, o->serial_log_max);
    if (o->serial_log && serial_log_open(serial, o->serial_log, o->serial_log_max) < 0) return fail("open serial log");
    *agent_fd = -1;
    if (o->agent_socket && unix_listen(o->agent_socket, agent_fd) < 0) return fail("listen on agent socket");
    return 0;
}

/*
 * The guest's command line from an inherited descriptor (a pipe or a file),
 * read to its end and closed: it may carry the agent's token, which must not
 * show in this process's own command line.
 */
static int read_cmdline_fd(int fd, char *buf, size_t size) {
    size_t used = 0;
    for (;;) {
        ssize_t n = read(fd, buf + used, size - 1 - used);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) return close(fd), fail("read the kernel command line from --cmdline-fd");
        if (n == 0) break;
        used += (size_t)n;
        if (used == size - 1) return close(fd), fprintf(stderr, "clade-vmm: kernel command line longer than %zu bytes\n", size - 1), VMM_EXIT_FAILURE;
    }
    close(fd);
    while (used && (buf[used - 1] == '\n' || buf[used - 1] == '\r')) used--;
    buf[used] = '\0';
    if (strlen(buf) != used) return fprintf(stderr, "clade-vmm: the kernel command line holds a NUL byte\n"), VMM_EXIT_FAILURE;
    return 0;
}

/* The Linux guest's machine answers the vCPU's exits; a guest that stops ends this process. */
static void attach_board(struct vmm *v, struct board *board) {
    v->board = board;
    v->cpu.ops = &board_guest_ops;
    v->cpu.guest = board;
    v->exit_on_stop = 1;
}

static int install_linux(struct vmm *v, const struct options *o, const struct board_disk *disk, const struct board_net *net) {
    struct board *board = &linux_board;
    static char given[CMDLINE_MAX], cmdline[CMDLINE_MAX];
    snprintf(given, sizeof given, "%s", o->cmdline ? o->cmdline : DEFAULT_CMDLINE);
    if (o->cmdline_fd >= 0 && read_cmdline_fd(o->cmdline_fd, given, sizeof given)) return VMM_EXIT_FAILURE;
    /* The board's PCI bus 0 has no ACPI root-bridge object: the kernel finds it by the peer-bus scan. */
    if ((size_t)snprintf(cmdline, sizeof cmdline, "%s pci=lastbus=1", given) >= sizeof cmdline)
        return fprintf(stderr, "clade-vmm: command line too long\n"), VMM_EXIT_FAILURE;
    struct pvh_boot boot = {.kernel = o->kernel, .initramfs = o->initramfs, .cmdline = cmdline};
    char err[256];
    if (pvh_boot_install(&v->vm, &boot, err, sizeof err) < 0) return fprintf(stderr, "clade-vmm: %s\n", err), VMM_EXIT_FAILURE;
    explicit_bzero(given, sizeof given); /* the token stays in guest RAM only */
    explicit_bzero(cmdline, sizeof cmdline);
    struct serial_log serial;
    int agent_fd;
    if (open_host_ends(o, &serial, &agent_fd)) return VMM_EXIT_FAILURE;
    if (board_init(board, &v->vm, &serial, agent_fd, o->agent_socket, disk, net) < 0) return fail("devices");
    attach_board(v, board);
    return 0;
}

/* The root VM: everything a child later inherits is learned here, once. */
static int build_root_vm(struct vmm *v, const struct options *o) {
    struct board_disk disk = {.fd = -1};
    char err[BOARD_DISK_PATH_MAX + 200];
    /* First: a disk that cannot be used is the caller's mistake, told before any VM is made. */
    if (o->disk && board_disk_open(&disk, o->disk, err, sizeof err) < 0) return fprintf(stderr, "clade-vmm: %s\n", err), VMM_EXIT_FAILURE;
    struct board_net net = {.fd = -1};
    if (o->net && board_net_connect(&net, o->net, err, sizeof err) < 0) return fprintf(stderr, "clade-vmm: %s\n", err), VMM_EXIT_FAILURE;
    if (vm_open(&v->vm, o->mem_mib << 20) < 0) return fail("open /dev/kvm and guest RAM");
    if (o->kernel) mark_hypervisor_present(v->vm.cpuid);
    if (vm_build_kvm_objects(&v->vm) < 0) return fail("create VM");
    vm_learn_features(&v->vm);
    if (vm_probe_msrs(&v->vm) < 0) return fail("list MSRs");
    if (o->kernel) {
        int r = install_linux(v, o, &disk, &net);
        if (r) return r;
    } else if (cpl3_guest_install(&v->vm, &test_guest, &v->cpu) < 0) {
        return fail("install CPL3 test guest");
    }
    if (state_alloc(&v->vm, &v->state) < 0) return fail("allocate state buffers");
    return 0;
}

static int restore_failed(int status, const char *what) {
    fprintf(stderr, "clade-vmm: cannot start from snapshot: %s\n", what);
    return status;
}

/* KVM refusing a value that passed our checks is the state's fault too (EINVAL), other errors are the host's. */
static int restore_step_failed(const char *step) {
    char what[200];
    snprintf(what, sizeof what, "KVM refused the saved %s (%s)%s", step, strerror(errno),
             errno == EINVAL ? ": state.bin holds an impossible value" : "");
    return restore_failed(errno == EINVAL ? VMM_EXIT_SNAPSHOT_REFUSED : VMM_EXIT_FAILURE, what);
}

/* The snapshot's two files as descriptors: inherited (--restore-fds), or opened here from DIR. */
static int snapshot_fds(const struct options *o, int fds[2]) {
    if (o->restore_fds[0] >= 0) {
        fds[0] = o->restore_fds[0], fds[1] = o->restore_fds[1];
        struct stat st;
        if (fstat(fds[0], &st) < 0 || fstat(fds[1], &st) < 0) return fail("--restore-fds: not open descriptors");
        return 0;
    }
    char path[4200];
    static const char *const names[2] = {"memory.raw", "state.bin"};
    for (int i = 0; i < 2; i++) {
        snprintf(path, sizeof path, "%s/%s", o->restore, names[i]);
        fds[i] = open(path, O_RDONLY | O_CLOEXEC);
        if (fds[i] < 0) {
            fprintf(stderr, "clade-vmm: cannot start from snapshot: cannot open %s: %s\n", path, strerror(errno));
            if (i) close(fds[0]);
            return VMM_EXIT_SNAPSHOT_REFUSED;
        }
    }
    return 0;
}

/*
 * The disk a snapshot names, opened again by its recorded path: the same
 * file must be there (the guest's page cache holds its blocks), so a missing
 * file or one of another size refuses the snapshot. disk->fd stays -1 when
 * the snapshot has no disk.
 */
static int reopen_snapshot_disk(const struct board_disk_state *saved, struct board_disk *disk) {
    char err[BOARD_DISK_PATH_MAX + 200], what[3 * BOARD_DISK_PATH_MAX + 200];
    disk->fd = -1;
    if (!saved->present) return 0;
    if (!memchr(saved->path, 0, sizeof saved->path) || saved->path[0] != '/')
        return restore_failed(VMM_EXIT_SNAPSHOT_REFUSED, "state.bin: the disk's path is not an absolute path");
    if (board_disk_open(disk, saved->path, err, sizeof err) < 0) {
        snprintf(what, sizeof what, "the snapshot's disk is gone: %s", err);
        return restore_failed(VMM_EXIT_SNAPSHOT_REFUSED, what);
    }
    if (disk->bytes == saved->bytes && !strcmp(disk->path, saved->path)) return 0;
    snprintf(what, sizeof what, "the snapshot's disk %s is another file now (%llu bytes at %s, %llu when the snapshot was taken)",
             saved->path, (unsigned long long)disk->bytes, disk->path, (unsigned long long)saved->bytes);
    close(disk->fd);
    disk->fd = -1;
    return restore_failed(VMM_EXIT_SNAPSHOT_REFUSED, what);
}

/*
 * A root VM started from a snapshot (snapshot.c): guest RAM is the snapshot's
 * memory.raw mapped copy-on-write, the state is restored with the same code
 * as a forked child's, and a fresh board takes the checked device state.
 */
/* Whether the snapshot had a NIC decides whether --net must be given: a guest with eth0 needs its network, one without has no NIC to give it. */
static int check_snapshot_net(const struct options *o, const struct board_state *devices) {
    bool had_nic = devices && devices->net.present;
    if (had_nic && !o->net)
        return restore_failed(VMM_EXIT_USAGE, "the snapshot's VM has a network: give its socket with --net SOCKET");
    if (!had_nic && o->net)
        return restore_failed(VMM_EXIT_USAGE, "the snapshot's VM has no network: start it without --net");
    return 0;
}

static int restore_root_vm(struct vmm *v, const struct options *o) {
    char err[300];
    struct board_state *devices = NULL;
    int fds[2];
    v->cpu.timing.fork_ns = now_ns(); /* status: a restored root's time zero is the start of its restore */
    struct board_net net = {.fd = -1};
    /* First: a network that cannot be reached is the caller's mistake, told before any VM is made. */
    if (o->net && board_net_connect(&net, o->net, err, sizeof err) < 0) return fprintf(stderr, "clade-vmm: %s\n", err), VMM_EXIT_FAILURE;
    int r = snapshot_fds(o, fds);
    if (r) return r;
    if (vm_open_kvm(&v->vm) < 0) return close(fds[0]), close(fds[1]), fail("open /dev/kvm");
    r = snapshot_load(v, fds[0], fds[1], &devices, err, sizeof err);
    if (r) return restore_failed(r, err);
    if ((r = check_snapshot_net(o, devices)) != 0) return free(devices), r;
    const char *failed = "vm";
    if (vm_build_kvm_objects(&v->vm) < 0) r = errno == EINVAL || errno == E2BIG ? restore_step_failed("CPUID") : fail("create VM");
    else if (snapshot_check_host(&v->vm, err, sizeof err) < 0) r = restore_failed(VMM_EXIT_SNAPSHOT_FOREIGN, err);
    else if ((v->cpu.timing.built_ns = now_ns(), state_restore(&v->vm, &v->state, &failed)) < 0) r = restore_step_failed(failed);
    if (r == 0 && devices) {
        struct serial_log serial;
        struct board_disk disk;
        int agent_fd = -1;
        if ((r = reopen_snapshot_disk(&devices->disk, &disk)) != 0) {
        } else if (open_host_ends(o, &serial, &agent_fd)) r = VMM_EXIT_FAILURE;
        else if (board_init(&linux_board, &v->vm, &serial, agent_fd, o->agent_socket, &disk, &net) < 0) r = fail("devices");
        else if (board_restore(&linux_board, devices) < 0)
            r = restore_failed(VMM_EXIT_SNAPSHOT_REFUSED, "state.bin: the device state holds a value the devices cannot have");
        if (r == 0) attach_board(v, &linux_board);
        else if (o->agent_socket && agent_fd >= 0) unlink(o->agent_socket);
    } else if (r == 0) {
        cpl3_guest_attach(&test_guest, &v->vm, &v->cpu);
    }
    v->cpu.timing.restored_ns = now_ns();
    free(devices);
    return r;
}

int main(int argc, char **argv) {
    struct options o;
    if (parse_options(argc, argv, &o) < 0) return usage();
    /* Least privilege: no setuid gains for anything this process might exec, files private to their owner. */
    prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
    umask(077);
    /* Children are reaped by the kernel (no zombies). This VMM is a subreaper: the children a spawner
       forks (fork.c) are re-parented to it when the spawner exits, so they stay its children. */
    signal(SIGCHLD, SIG_IGN);
    prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);
    signal(SIGPIPE, SIG_IGN);
    static struct vmm v;
    v.cpu.vm = &v.vm;
    v.cpu.idle_us = (uint32_t)o.idle_us;
    bool restoring = o.restore || o.restore_fds[0] >= 0;
    int status = restoring ? restore_root_vm(&v, &o) : build_root_vm(&v, &o);
    if (status) return status;
    int listen_fd;
    if (unix_listen(o.socket_path, &listen_fd) < 0) {
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
