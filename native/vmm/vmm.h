/*
 * clade-vmm: a small KVM VMM built so that fork(2) of the VMM process is a
 * copy-on-write branch of the whole running VM (docs/vmm.md).
 *
 * Layers, each in its own file:
 *   vm.c       KVM VM, guest RAM, irqchip, PIT, the vCPU and its CPUID/MSR lists
 *   state.c    capture and restore of every piece of vCPU and VM state
 *   vcpu.c     the vCPU thread: KVM_RUN loop, exit handling, park/resume
 *   fork.c     the fork core: park, capture, fork(2) (through a spawner for many children), child rebuild
 *   control.c  the control channel (unix socket, line protocol)
 *   control_test.c  control requests only the test build has (guest memory, the test guest's mailbox)
 *   board.c    the Linux guest's machine: devices/ wired to exits, interrupts, the agent socket
 *   guest/     the PVH loader for Linux (pvh.c) and the test guest that stays at CPL3 (cpl3.c)
 *   util.c     shared helpers: clock, whole reads and writes, unix listen, the reply buffer
 *
 * The vCPU loop knows no particular guest: each machine (the Linux board,
 * the CPL3 test guest) is one struct guest_ops.
 */
#ifndef CLADE_VMM_H
#define CLADE_VMM_H

#include <linux/kvm.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "devices/cmos.h"
#include "devices/guest_mem.h"
#include "devices/pci.h"
#include "devices/uart8250.h"
#include "devices/virtio_blk.h"
#include "devices/virtio_console.h"
#include "devices/virtio_net.h"

#define VMM_MAX_MSRS 256
#define VMM_MAX_CPUID_ENTRIES 256
#define VMM_MAX_FORK_BATCH 256

/* Exit statuses of clade-vmm (docs/vmm.md, "Exit status"). */
#define VMM_EXIT_FAILURE 1          /* could not start or run: the message says why */
#define VMM_EXIT_USAGE 2            /* bad command line */
#define VMM_EXIT_GUEST_FAILED 3     /* a Linux guest stopped other than by shutting down */
#define VMM_EXIT_SNAPSHOT_REFUSED 4 /* the snapshot's files are damaged, forged or inconsistent: nothing was started */
#define VMM_EXIT_SNAPSHOT_FOREIGN 5 /* the snapshot needs KVM features this host does not have (or lacks ones it has) */

/* ---- util.c ----------------------------------------------------------- */

int64_t now_ns(void); /* CLOCK_MONOTONIC */
/* pread until `len` bytes are read at `off`; -1 on an error or a short file. */
int read_exact(int fd, void *buf, size_t len, off_t off);
/* pwrite all of `len` at `at`; -1 on an error. */
int write_all_at(int fd, const void *buf, size_t len, off_t at);
/* A bound, listening, non-blocking, close-on-exec unix stream socket at path; 0, or -1 with errno. */
int unix_listen(const char *path, int *fd_out);
/* A unix stream socket connected to path (blocking connect, then non-blocking, close-on-exec); the descriptor, or -1 with errno. */
int unix_connect(const char *path);
/* A decimal or 0x hex number that must parse completely (no sign); 0 or -1. */
int parse_u64(const char *s, uint64_t *out);

/*
 * A bounded text buffer (control replies, status fields). An append that
 * would not fit is not written and marks the buffer as overflowed, so a
 * reply is never cut off mid-JSON; one byte always stays free.
 */
struct text_buf {
    char *data;
    size_t cap;
    size_t len;
    bool overflow;
};

void tb_init(struct text_buf *t, char *storage, size_t cap);
void tb_reset(struct text_buf *t);
void tb_printf(struct text_buf *t, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void tb_json_string(struct text_buf *t, const char *s); /* quoted and escaped */

/* ---- vm.c ------------------------------------------------------------- */

struct vm {
    int kvm_fd; /* /dev/kvm: not tied to a process, so a forked child keeps using it */
    int vm_fd;
    int vcpu_fd;
    struct kvm_run *run;
    size_t run_size;
    uint8_t *ram; /* host address of guest RAM: identical in every forked child */
    uint64_t ram_size;
    struct kvm_cpuid2 *cpuid;
    uint32_t msr_index[VMM_MAX_MSRS]; /* MSRs that can be read and written back */
    uint32_t msr_count;
    uint32_t xsave_size; /* bytes for KVM_GET_XSAVE2; 0: only KVM_GET_FPU works */
    int has_xsave2;
    int has_xcrs;
    int has_sregs2;
    int has_tsc_offset_attr;
    int has_debugregs;
    int has_sync_regs; /* KVM stores REGS, SREGS and VCPU_EVENTS into kvm_run at every KVM_RUN return */
};

int vm_open(struct vm *vm, uint64_t ram_size);
int vm_open_kvm(struct vm *vm); /* vm_open without guest RAM */
int vm_build_kvm_objects(struct vm *vm);
void vm_learn_features(struct vm *vm); /* root only, after the first build */
int vm_probe_msrs(struct vm *vm);
void vm_close_kvm_objects_later(int vm_fd, int vcpu_fd, struct kvm_run *run, size_t run_size);
/* Returns a pointer into guest RAM for [gpa, gpa+len) or NULL when out of range. */
uint8_t *vm_guest_ptr(const struct vm *vm, uint64_t gpa, uint64_t len);

/* ---- state.c ---------------------------------------------------------- */

/* Plain data (KVM's own structs): saved as is in a snapshot's vCPU section. */
struct vcpu_state {
    struct kvm_regs regs;
    struct kvm_sregs sregs;
    struct kvm_sregs2 sregs2;
    struct kvm_fpu fpu;
    struct kvm_xcrs xcrs;
    struct kvm_lapic_state lapic;
    struct kvm_vcpu_events events;
    struct kvm_mp_state mp_state;
    struct kvm_debugregs debugregs;
    uint64_t tsc_offset;
    uint64_t host_tsc; /* host TSC at capture: the child moves the guest TSC on by the time restore took */
};

struct vm_state {
    struct kvm_irqchip pic_master;
    struct kvm_irqchip pic_slave;
    struct kvm_irqchip ioapic;
    struct kvm_pit_state2 pit;
    struct kvm_clock_data clock;
};

struct machine_state {
    struct vcpu_state vcpu;
    struct vm_state vm;
    struct kvm_xsave *xsave; /* xsave_size bytes, allocated once, inherited by children */
    struct kvm_msrs *msrs;   /* room for VMM_MAX_MSRS entries, allocated once */
    uint32_t msrs_not_restored; /* written by the last restore, reported by status */
};

int state_alloc(const struct vm *vm, struct machine_state *st);
int state_capture(const struct vm *vm, struct machine_state *st, const char **failed);
int state_restore(const struct vm *vm, struct machine_state *st, const char **failed);

/* ---- vcpu.c ----------------------------------------------------------- */

enum vcpu_phase { VCPU_RUNNING, VCPU_PARKED, VCPU_STOPPED };

/*
 * The machine around the vCPU: what answers its port and MMIO exits. The
 * vCPU loop calls only these; the Linux board (board.c) and the CPL3 test
 * guest (guest/cpl3.c) are the two implementations. Calls come from the
 * vCPU thread; `status` from the control thread.
 */
enum guest_exit_result { GUEST_EXIT_DONE, GUEST_EXIT_RESET };

struct guest_ops {
    const char *name; /* `status` reports it as "guest" */
    /* One port access (string I/O comes item by item); data holds `size` bytes to write or to fill. */
    enum guest_exit_result (*io)(void *guest, uint16_t port, bool is_write, uint8_t *data, unsigned size);
    /* One MMIO access of 1-8 bytes outside guest RAM. */
    enum guest_exit_result (*mmio)(void *guest, uint64_t gpa, bool is_write, uint8_t *data, unsigned len);
    /* In a forked child, before its vCPU first runs: per-process counters start again, interrupts in flight are raised again. */
    void (*forked)(void *guest);
    /* The guest's own fields of the `status` reply, each as `,"name":value`. */
    void (*status)(void *guest, struct text_buf *out);
};

struct vcpu_timing {
    int64_t fork_ns;       /* CLOCK_MONOTONIC just before fork(2), 0 in the root VMM */
    int64_t built_ns;      /* child: new VM, irqchip, PIT and vCPU created */
    int64_t restored_ns;   /* child: state restored */
    int64_t first_run_ns;  /* first KVM_RUN of this process */
    int64_t first_exit_ns; /* first guest exit after that KVM_RUN */
};

struct vcpu {
    struct vm *vm;
    pthread_t thread;
    int thread_started;
    pthread_mutex_t lock;
    pthread_cond_t cond;
    atomic_int park_requested;
    int parked;        /* under lock */
    int resume_ticket; /* under lock: bumped by vcpu_resume */
    int kick_fd;       /* eventfd: ends an idle wait early */
    int stop_fd;       /* eventfd: written once when the vCPU stops for good, wakes the control thread */
    const struct guest_ops *ops; /* the machine that answers exits */
    void *guest;                 /* its state, passed to every op */
    uint32_t idle_us;  /* how long vcpu_idle waits at most */
    atomic_int phase;
    atomic_uint_fast64_t exits;
    char stop_reason[32];  /* set once before phase becomes VCPU_STOPPED */
    char stop_detail[160];
    struct vcpu_timing timing;
};

int vcpu_init_sync(struct vcpu *cpu);
int vcpu_start(struct vcpu *cpu);
_Noreturn void vcpu_run_on_this_thread(struct vcpu *cpu);
/* Stops the vCPU at a safe point (I/O completed). 0, or -1 with errno ESRCH (stopped for good) or ETIMEDOUT (did not stop in time). */
int vcpu_park(struct vcpu *cpu);
void vcpu_resume(struct vcpu *cpu);
void vcpu_kick(struct vcpu *cpu);
/* The guest has nothing to do (a heartbeat, like HLT): wait up to idle_us, or until kicked or asked to park. vCPU thread only. */
void vcpu_idle(struct vcpu *cpu);

/* ---- guest/cpl3.c ----------------------------------------------------- */

/* Guest-physical layout of the CPL3 test guest (identity mapped). */
#define GUEST_PML4 0x1000u
#define GUEST_PDPT 0x2000u
#define GUEST_PD 0x3000u
#define GUEST_GDT 0x4000u
#define GUEST_TSS 0x5000u
#define GUEST_CODE 0x8000u
#define GUEST_DATA 0x10000u
#define GUEST_STACK_TOP 0x20000u
/* Data page fields, offsets from GUEST_DATA. */
#define GUEST_COUNTER 0x00u /* incremented by the guest loop */
#define GUEST_CMD 0x08u     /* host writes a command, the guest clears it */
#define GUEST_ARG 0x10u
#define GUEST_ACK 0x18u    /* incremented by the guest after each command */
#define GUEST_STORED 0x20u /* the guest stores GUEST_ARG here on command 4 */
#define GUEST_PD_MMIO 0x6000u
/* MMIO registers the guest writes from CPL3; nothing backs them, so each write exits to the VMM. */
#define GUEST_MMIO_BASE 0xc0000000ull
#define MMIO_REPORT (GUEST_MMIO_BASE + 0x0)
#define MMIO_HEARTBEAT (GUEST_MMIO_BASE + 0x8)

/* The test guest's side of the VMM: the MMIO registers it writes, and what status reports of it. */
struct cpl3_guest {
    struct vcpu *cpu; /* a heartbeat idles it */
    const struct vm *vm;
    atomic_uint_fast64_t heartbeats;
    atomic_uint_fast64_t reports;
    atomic_uint_fast64_t last_report;
};

extern const struct guest_ops cpl3_guest_ops;

/* Writes page tables, GDT, TSS and code into guest RAM and sets the vCPU at CPL3; then g answers its exits. */
int cpl3_guest_install(struct vm *vm, struct cpl3_guest *g, struct vcpu *cpu);
/* A start from a snapshot: RAM and registers come from the snapshot, only the VMM side is set up. */
void cpl3_guest_attach(struct cpl3_guest *g, const struct vm *vm, struct vcpu *cpu);

/* ---- guest/pvh.c ------------------------------------------------------ */

struct pvh_boot {
    const char *kernel;    /* uncompressed ELF vmlinux with a PVH entry note */
    const char *initramfs; /* loaded at the top of RAM as module 0 */
    const char *cmdline;
};

/* Loads kernel, initramfs, command line and start_info, and sets the vCPU at the PVH entry. */
int pvh_boot_install(struct vm *vm, const struct pvh_boot *boot, char *err, size_t errlen);

/* ---- guest/acpi.c ----------------------------------------------------- */

/* RSDP/XSDT/FADT/DSDT/MADT in the ISA hole; returns the RSDP's address, 0 if RAM is too small. */
uint64_t acpi_tables_install(struct vm *vm);

/* ---- board.c ---------------------------------------------------------- */

/* Guest-physical layout above RAM (RAM ends below 3 GiB): BARs here, then IOAPIC, LAPIC/MSI at 0xfec00000+. */
#define BOARD_PCI_MMIO_BASE 0xe0000000ull
#define BOARD_PCI_MMIO_SIZE 0x10000000ull
#define BOARD_MAX_RAM (3ull << 30)
#define BOARD_AGENT_PORT 0 /* virtio-console port id of org.clade.agent */

/*
 * The serial console's log: append-only and non-blocking (a stuck reader
 * never stalls the vCPU), and never larger than max_bytes. At the cap the
 * file is renamed to PATH.1 (replacing the previous one) and PATH starts
 * again, so a guest flooding its console costs at most two files' worth.
 */
#define SERIAL_LOG_DEFAULT_MAX (2ull << 20)
#define SERIAL_LOG_PATH_MAX 512

struct serial_log {
    int fd; /* -1: no log, output is dropped */
    uint64_t bytes; /* in the current file */
    uint64_t max_bytes;
    char path[SERIAL_LOG_PATH_MAX];
};

/* 0, or -1 with errno (ENAMETOOLONG when PATH.1 would not fit). */
int serial_log_open(struct serial_log *log, const char *path, uint64_t max_bytes);
void serial_log_none(struct serial_log *log, uint64_t max_bytes);
void serial_log_write(struct serial_log *log, uint8_t byte);

/* The read-only root disk (--disk): an absolute path, opened O_RDONLY. */
#define BOARD_DISK_PATH_MAX 1024

struct board_disk {
    int fd;              /* -1: no disk */
    uint64_t bytes;      /* the file's size when opened */
    char path[BOARD_DISK_PATH_MAX]; /* absolute, as recorded in snapshots */
};

/* Opens PATH read-only as the board's disk (path made absolute); 0, or -1 with a message in err. */
int board_disk_open(struct board_disk *disk, const char *path, char *err, size_t errlen);

/*
 * The network (--net): a connected unix stream socket to the sandbox's
 * network process, which speaks QEMU's stream-netdev framing. Each forked
 * child connects to its own (RUN_DIR/net.sock).
 */
#define BOARD_NET_PATH_MAX 108
#define BOARD_NET_SOCKET_NAME "net.sock" /* a forked child's, in its run directory */
#define BOARD_NET_MAC {0x52, 0x54, 0x00, 0xc1, 0xad, 0x0f} /* the same in every sandbox: each has its own network */

struct board_net {
    bool present;
    int fd; /* the connection, -1 once it is gone */
    char path[BOARD_NET_PATH_MAX];
};

/* Connects to the absolute unix socket PATH; 0, or -1 with a message in err. */
int board_net_connect(struct board_net *net, const char *path, char *err, size_t errlen);
struct board {
    pthread_mutex_t lock; /* devices are single-threaded: vCPU exits and the control thread take turns */
    struct vm *vm;
    struct guest_mem mem;
    struct pci_bus pci;
    struct uart8250 uart;
    struct virtio_console con;
    struct virtio_blk blk; /* set up only when disk.fd >= 0 */
    struct board_disk disk; /* one descriptor shared by every forked child: nothing ever writes it */
    struct virtio_net nic;  /* set up only when net.present */
    struct board_net net;   /* each forked child has its own connection */
    unsigned net_polled;    /* under lock: what the control thread's poll set waits for on the network socket */
    struct cmos cmos;
    struct serial_log serial;
    int agent_listen_fd;
    int agent_fd; /* the connected host end, -1 when none */
    char agent_path[108];
    int wake_fd; /* eventfd: the vCPU thread tells the control thread to re-poll */
    unsigned agent_polled; /* under lock: what the control thread's poll set waits for on the agent port */
    uint64_t agent_connects;
};

/*
 * The board's device state as plain data (a snapshot's device section):
 * what the guest can change, and nothing of the host (no pointers,
 * callbacks or descriptors). Every device keeps its own part.
 */
/* The disk's part: which file it was (a restore opens that path again and
 * refuses a file of another size) and the device's own state. Zeros: no disk. */
struct board_disk_state {
    uint32_t present;
    uint32_t reserved; /* 0 */
    uint64_t bytes;
    char path[BOARD_DISK_PATH_MAX]; /* NUL-terminated, zero-padded */
    struct virtio_blk_state blk;
};

/* The network's part: whether the VM has a NIC, and its state. Zeros: none. The
 * socket is not saved: a restore is given one (--net). */
struct board_net_state {
    uint32_t present;
    uint32_t reserved; /* 0 */
    struct virtio_net_state nic;
};

struct board_state {
    struct pci_bus_state pci;
    struct virtio_console_state con;
    struct uart_state uart;
    struct cmos_state cmos;
    struct board_disk_state disk;
    struct board_net_state net;
};

/* Host descriptors a forked child inherited and closes once its vCPU runs. */
struct board_stale {
    int agent_fd, agent_listen_fd, wake_fd, serial_fd, hungup_fd;
    int net_fd, net_hungup_fd; /* the parent's network connection */
};

#define BOARD_MAX_POLLFDS 4

/* The board as the vCPU loop sees it (ctx: struct board *). */
extern const struct guest_ops board_guest_ops;

/* The board takes over `serial` (its descriptor), agent_listen_fd, the disk's descriptor (disk NULL or fd -1: no disk)
 * and the network's connection (net NULL or not present: no NIC). */
int board_init(struct board *b, struct vm *vm, const struct serial_log *serial, int agent_listen_fd, const char *agent_path,
               const struct board_disk *disk, const struct board_net *net);
/* Closes what the board holds (not the agent socket's path). */
void board_destroy(struct board *b);
enum guest_exit_result board_io(struct board *b, uint16_t port, bool is_write, uint8_t *data, unsigned size);
void board_mmio(struct board *b, uint64_t gpa, bool is_write, uint8_t *data, unsigned len);
int board_poll_fill(struct board *b, struct pollfd *pfd); /* at most BOARD_MAX_POLLFDS */
void board_poll_handle(struct board *b, const struct pollfd *pfd, int n);
/* In a forked child: its own host ends. serial->fd < 0: the child logs nowhere (never into its parent's log).
 * net_fd: the child's own network connection (with a NIC), net_path where it leads. */
void board_child_rebind(struct board *b, int agent_listen_fd, const char *agent_path, const struct serial_log *serial,
                        int net_fd, const char *net_path, struct board_stale *stale);
void board_close_stale(const struct board_stale *stale);
void board_save(const struct board *b, struct board_state *s);
/*
 * Start from a snapshot: b was just set up by board_init (this process's
 * RAM, callbacks, descriptors); each device takes its part only after
 * checking every value of it. -1 if s is refused: b may then hold some
 * devices' parts, so it must not run.
 */
int board_restore(struct board *b, const struct board_state *s);

/* ---- fork.c ----------------------------------------------------------- */

struct vmm; /* forward */

struct fork_child {
    int pid;
    char socket_path[108];
    char agent_path[108]; /* empty without a board */
};

/* What a fork request may choose for each child; NULL fields get defaults. */
struct fork_paths {
    const char *run_dir;      /* the child's own directory: control.sock, agent.sock and serial.log in it */
    const char *socket;       /* or each path on its own */
    const char *agent_socket;
    const char *serial_log;   /* NULL: next to the child's control socket, if the parent has a log */
};

/*
 * A forked child's own start: runs on the child's new thread once its vCPU
 * runs (the forking thread became the vCPU thread), with the listening
 * control socket the parent bound for it. Never returns. The control channel
 * passes its own, so the fork core knows nothing of the protocol.
 */
typedef void (*vmm_child_main)(struct vmm *v, int ctl_fd, const char *ctl_path);

struct fork_request {
    int count;                       /* 1..VMM_MAX_FORK_BATCH */
    const struct fork_paths *paths;  /* count entries, or NULL: every path a default */
    const char *default_dir;         /* where a child's files go when its paths name none */
    vmm_child_main child_main;
};

struct fork_report {
    int count;  /* children made (and listed in child[]) */
    int wanted; /* children asked for: child[] holds every one's paths */
    struct fork_child child[VMM_MAX_FORK_BATCH];
    int64_t park_ns;    /* stop request until vCPU parked */
    int64_t capture_ns; /* state capture */
    int64_t fork_ns;    /* the parent's fork(2): the child's, or the spawner's */
    int64_t pause_ns;   /* stop request until the parent vCPU resumed */
    int64_t spawn_ns;   /* the spawner's fork(2) calls, all children (0 for a single child) */
    /* While a spawner is still forking: it reports each child on this pipe (vmm_fork_collect). */
    int spawner_fd;
    int spawner_pid;
    size_t partial; /* bytes of a record read so far */
    uint8_t record[16];
    char error[160]; /* why collecting ended short */
};

/*
 * Forks the running VM into req->count children with one pause of the
 * parent. One child is forked directly. For more, the parent forks one
 * frozen "spawner" copy of itself and resumes at once; the spawner forks the
 * children and reports them on a pipe, so the parent's pause does not grow
 * with the count. Returns 0 when every child is made (rep complete), 1 when
 * the spawner is still at work (call vmm_fork_collect when rep->spawner_fd
 * is readable), -1 on failure (rep lists the children made, err says why).
 * In a child it never returns: its forking thread becomes the vCPU thread
 * and req->child_main runs on a new one.
 */
int vmm_fork(struct vmm *v, const struct fork_request *req, struct fork_report *rep, char *err, size_t errlen);
/* Reads what the spawner reported: 1 while children are outstanding, 0 once all are made, -1 if it stopped short (rep->error). */
int vmm_fork_collect(struct vmm *v, struct fork_report *rep);
/* Gives up on a spawner that did not finish in time: it is killed; rep keeps the children it reported. */
void vmm_fork_abandon(struct vmm *v, struct fork_report *rep);

/* Snapshot to disk: park, capture, fork(2) one writer child that saves RAM and state to DIR (snapshot.c), resume. */
struct snapshot_report {
    int writer_pid;
    int64_t park_ns, capture_ns, fork_ns, pause_ns;
};

int vmm_snapshot(struct vmm *v, const char *dir, struct snapshot_report *rep, char *err, size_t errlen);

/* ---- snapshot_format.c, snapshot.c ------------------------------------ */

/*
 * state.bin, format 4 (docs/snapshots.md, "vmm engine"): a header, then
 * sections. Little-endian (x86-64 only). Every section is plain data: KVM's
 * own structs for the CPU and VM, and the devices' *_state structs; nothing
 * in it is a host address, a descriptor or a function.
 */
#define SNAPSHOT_MAGIC "CLADEVMS"
#define SNAPSHOT_FORMAT 4u /* 3: the board state has the disk's part; 4: and the network's */
#define SNAPSHOT_BUILD_ID_MAX 64u
#define SNAPSHOT_STATE_MAX (16u << 20) /* far above any real state.bin: a bigger one is refused unread */
#define SNAPSHOT_MAX_XSAVE (1u << 20)

struct snapshot_header {
    char magic[8];
    uint32_t format;
    uint32_t header_bytes;
    uint32_t build_id_len;
    uint32_t section_count;
    uint8_t build_id[SNAPSHOT_BUILD_ID_MAX]; /* the GNU build id of the clade-vmm that wrote it (diagnostics only) */
    uint64_t ram_size;
    uint64_t checksum;    /* FNV-1a 64 of the whole file, this field taken as 0 */
    uint64_t total_bytes; /* the whole file */
};

struct snapshot_section {
    uint32_t id;
    uint32_t reserved; /* 0 */
    uint64_t bytes;    /* payload that follows, then zero padding to a multiple of 8 */
};

enum snapshot_section_id {
    SNAP_VM_FACTS = 1, /* struct snapshot_vm_facts */
    SNAP_CPUID = 2,    /* kvm_cpuid_entry2[nent] (nent = bytes / entry size) */
    SNAP_VCPU = 3,     /* struct vcpu_state */
    SNAP_XSAVE = 4,    /* xsave_size bytes */
    SNAP_MSRS = 5,     /* kvm_msr_entry[msr_count] */
    SNAP_VM_STATE = 6, /* struct vm_state */
    SNAP_BOARD = 7,    /* struct board_state (Linux guests only) */
};

struct snapshot_vm_facts {
    uint32_t msr_count, xsave_size, has_xsave2, has_xcrs, has_sregs2, has_tsc_offset_attr, has_debugregs;
    uint32_t guest_linux; /* 1: a Linux guest with a board, 0: the CPL3 test guest */
    uint32_t msr_index[VMM_MAX_MSRS];
};

/* state.bin as plain values: what the writer encodes, and what the decoder hands out after checking it. */
struct snapshot_image {
    uint64_t ram_size;
    uint32_t build_id_len;
    uint8_t build_id[SNAPSHOT_BUILD_ID_MAX];
    struct snapshot_vm_facts facts;
    uint32_t cpuid_count;
    struct kvm_cpuid_entry2 cpuid[VMM_MAX_CPUID_ENTRIES];
    struct vcpu_state vcpu;
    const uint8_t *xsave; /* facts.xsave_size bytes: the writer's buffer, or inside the decoded file */
    struct kvm_msr_entry msrs[VMM_MAX_MSRS];
    struct vm_state vm;
    int has_board;
    struct board_state board;
};

uint64_t snapshot_checksum(const uint8_t *buf, size_t len);
/* A malloc'd state.bin for img; -1 when out of memory. */
int snapshot_encode(const struct snapshot_image *img, uint8_t **out, size_t *len);
/*
 * Checks a state.bin completely (magic, format, checksum, section table,
 * every size, count, index and flag) and copies its values into img.
 * -1 with a message that names what is wrong. The device state is checked
 * against the devices later, by board_restore.
 */
int snapshot_decode(const uint8_t *buf, size_t len, struct snapshot_image *img, char *err, size_t errlen);

/* Runs in the writer child; never returns. Writes DIR/memory.raw, DIR/state.bin, then DIR/done (a JSON result line). */
_Noreturn void snapshot_writer_main(const struct vmm *v, const char *dir);
/*
 * Start from a snapshot's two files, given as open descriptors (closed by
 * this call): loads the checked state.bin into v and maps memory.raw
 * copy-on-write. Call after vm_open_kvm. *board gets the device state
 * (malloc'd) for a Linux guest, else NULL. Returns 0 or the exit status to
 * end with (VMM_EXIT_SNAPSHOT_REFUSED when the files are at fault).
 */
int snapshot_load(struct vmm *v, int mem_fd, int state_fd, struct board_state **board, char *err, size_t errlen);
/* After the KVM objects are built: refuses a snapshot whose KVM features differ from this host's. */
int snapshot_check_host(const struct vm *vm, char *err, size_t errlen);

/* ---- control.c -------------------------------------------------------- */

#define CONTROL_MAX_CLIENTS 32
/* Room for `forks 256 DIR...` with every DIR as long as a socket path allows. */
#define CONTROL_LINE_MAX 65536

struct control_client {
    int fd;
    size_t used;
    /* A fork whose spawner is still at work: this client's next lines wait until it is answered. */
    struct fork_report *pending;
    int64_t pending_deadline;
    char buf[CONTROL_LINE_MAX];
};

struct control {
    int listen_fd;
    char socket_path[108];
    char socket_dir[108];
    struct control_client *client[CONTROL_MAX_CLIENTS];
};

int control_init(struct control *c, int listen_fd, const char *path);
int control_serve(struct vmm *v); /* returns the process exit code */

/*
 * Requests beyond the protocol's own: the test build links control_test.c
 * (guest memory reads and writes, the test guest's mailbox), the product
 * build an empty list (control_test_none.c). A request answers by appending
 * to `out` (control_reply_*).
 */
struct control_command {
    const char *verb;
    void (*run)(struct vmm *v, int argc, char **argv, struct text_buf *out);
};

extern const struct control_command control_test_commands[]; /* ends with a NULL verb */
void control_reply_ok(struct text_buf *out);
void control_reply_error(struct text_buf *out, const char *message);

/* ---- main.c ----------------------------------------------------------- */

struct vmm {
    struct vm vm;
    struct vcpu cpu;
    struct machine_state state;
    struct control ctl;
    struct board *board; /* the Linux guest's devices and host ends; NULL for the CPL3 test guest */
    int exit_on_stop;    /* Linux guests: the process ends when the vCPU stops (reset, shutdown, error) */
    int depth;       /* 0 for the root VMM, +1 per fork generation */
    int user_paused; /* a "pause" request holds the vCPU parked */
    uint64_t forks_done;
    uint32_t next_child_seq; /* names of default child paths */
};

#endif
