/*
 * clade-vmm: a small KVM VMM built so that fork(2) of the VMM process is a
 * copy-on-write branch of the whole running VM (docs/vmm.md).
 *
 * Layers, each in its own file:
 *   vm.c       KVM VM, guest RAM, irqchip, PIT, the vCPU and its CPUID/MSR lists
 *   state.c    capture and restore of every piece of vCPU and VM state
 *   vcpu.c     the vCPU thread: KVM_RUN loop, exit handling, park/resume
 *   fork.c     the fork core: park, capture, fork(2), child rebuild
 *   control.c  the control channel (unix socket, line protocol)
 *   guest/     the test guest that stays at CPL3
 */
#ifndef CLADE_VMM_H
#define CLADE_VMM_H

#include <linux/kvm.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#define VMM_MAX_MSRS 256
#define VMM_MAX_CPUID_ENTRIES 256
#define VMM_MAX_FORK_BATCH 256

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
};

int vm_open(struct vm *vm, uint64_t ram_size);
int vm_build_kvm_objects(struct vm *vm);
void vm_learn_features(struct vm *vm); /* root only, after the first build */
int vm_probe_msrs(struct vm *vm);
void vm_close_kvm_objects_later(int vm_fd, int vcpu_fd, struct kvm_run *run, size_t run_size);
/* Returns a pointer into guest RAM for [gpa, gpa+len) or NULL when out of range. */
uint8_t *vm_guest_ptr(const struct vm *vm, uint64_t gpa, uint64_t len);

/* ---- state.c ---------------------------------------------------------- */

struct vcpu_state {
    struct kvm_regs regs;
    struct kvm_sregs sregs;
    struct kvm_sregs2 sregs2;
    struct kvm_fpu fpu;
    struct kvm_xsave *xsave; /* xsave_size bytes, allocated once, inherited by children */
    struct kvm_xcrs xcrs;
    struct kvm_msrs *msrs; /* msr_count entries, allocated once */
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
    uint32_t msrs_not_restored; /* written by the last restore, reported by status */
};

int state_alloc(const struct vm *vm, struct machine_state *st);
int state_capture(const struct vm *vm, struct machine_state *st, const char **failed);
int state_restore(const struct vm *vm, struct machine_state *st, const char **failed);

/* ---- vcpu.c ----------------------------------------------------------- */

enum vcpu_phase { VCPU_RUNNING, VCPU_PARKED, VCPU_STOPPED };

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
    uint32_t idle_us;  /* how long a heartbeat exit idles the vCPU */
    atomic_int phase;
    atomic_uint_fast64_t exits;
    atomic_uint_fast64_t heartbeats;
    atomic_uint_fast64_t reports;
    atomic_uint_fast64_t last_report;
    char stop_reason[32];  /* set once before phase becomes VCPU_STOPPED */
    char stop_detail[160];
    struct vcpu_timing timing;
};

int vcpu_init_sync(struct vcpu *cpu);
int vcpu_start(struct vcpu *cpu);
_Noreturn void vcpu_run_on_this_thread(struct vcpu *cpu);
/* Stops the vCPU at a safe point (I/O completed). 0, or -1 if it has stopped for good. */
int vcpu_park(struct vcpu *cpu);
void vcpu_resume(struct vcpu *cpu);
void vcpu_kick(struct vcpu *cpu);

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

int cpl3_guest_install(struct vm *vm);

/* ---- fork.c ----------------------------------------------------------- */

struct vmm; /* forward */

struct fork_child {
    int pid;
    char socket_path[108];
};

struct fork_report {
    int count;
    struct fork_child child[VMM_MAX_FORK_BATCH];
    int64_t park_ns;    /* stop request until vCPU parked */
    int64_t capture_ns; /* state capture */
    int64_t fork_ns;    /* all fork(2) calls */
    int64_t pause_ns;   /* stop request until the parent vCPU resumed */
};

/* Returns 0/-1 in the parent; never returns in a child (its forking thread becomes the vCPU thread). */
int vmm_fork(struct vmm *v, int count, const char *const *paths, struct fork_report *rep, char *err, size_t errlen);

/* ---- control.c -------------------------------------------------------- */

#define CONTROL_MAX_CLIENTS 32
#define CONTROL_LINE_MAX 16384

struct control_client {
    int fd;
    size_t used;
    char buf[CONTROL_LINE_MAX];
};

struct control {
    int listen_fd;
    char socket_path[108];
    char socket_dir[108];
    struct control_client *client[CONTROL_MAX_CLIENTS];
    uint32_t next_child_seq;
};

int control_listen(const char *path, int *fd_out);
int control_init(struct control *c, int listen_fd, const char *path);
int control_serve(struct vmm *v); /* returns the process exit code */
void control_drop_inherited(struct control *c, int keep_fd, const char *new_path);

/* ---- main.c ----------------------------------------------------------- */

struct vmm {
    struct vm vm;
    struct vcpu cpu;
    struct machine_state state;
    struct control ctl;
    int depth;       /* 0 for the root VMM, +1 per fork generation */
    int user_paused; /* a "pause" request holds the vCPU parked */
    uint64_t forks_done;
};

int64_t now_ns(void);

#endif
