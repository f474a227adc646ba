/*
 * The fork core.
 *
 * Parent: park the vCPU at a safe point, capture the machine state into
 * ordinary memory, fork(2), resume. Only the forking (control) thread exists
 * in a child, and its copy of guest RAM is copy-on-write.
 *
 * Many children, one short pause: the parent forks once, a frozen "spawner"
 * copy of itself, and resumes its vCPU; the spawner forks the children and
 * reports each one on a pipe, then exits. Its children are re-parented to the
 * parent, a child subreaper (main.c), so they stay its children as with a
 * direct fork. The parent's pause is park + capture + one fork(2), whatever
 * the count.
 *
 * Child: the inherited KVM VM belongs to the parent's process and cannot be
 * used, so it builds a new VM over the same host address of guest RAM and
 * restores the captured state; then the forking thread runs the vCPU itself
 * and a new thread runs the caller's child_main with the listening socket
 * the parent prepared before the pause (so it accepts connections the moment
 * fork returns). Closing inherited fds and stale KVM objects happens on that
 * thread, off the path to a running child.
 */
#include "vmm.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <unistd.h>

static void child_fail(struct vmm *v, const char *step) {
    snprintf(v->cpu.stop_reason, sizeof v->cpu.stop_reason, "restore-failed");
    snprintf(v->cpu.stop_detail, sizeof v->cpu.stop_detail, "%s: %s", step, strerror(errno));
    atomic_store(&v->cpu.phase, VCPU_STOPPED);
}

/* The host ends one child gets, prepared by the parent before the pause so they work the moment it replies. */
struct child_slot {
    int ctl_fd;
    char ctl_path[108];
    int agent_fd; /* -1 without a board */
    char agent_path[108];
    struct serial_log serial; /* fd -1: the child has no serial log */
    char net_path[108];       /* with a NIC: RUN_DIR/net.sock, which the child connects to itself */
};

/* What the child's new thread tidies up, after the vCPU already runs. */
static struct child_takeover {
    struct vmm *v;
    vmm_child_main child_main;
    struct child_slot own;
    const struct child_slot *slots; /* every slot of the batch: the siblings' descriptors are not ours */
    int siblings;
    int stale_vm_fd, stale_vcpu_fd, stale_kick_fd, stale_stop_fd;
    int stale_spawner_fd; /* the spawner's report pipe, -1 for a direct fork */
    struct kvm_run *stale_run;
    struct board_stale board;
} takeover;

static void close_sibling_slots(const struct child_takeover *t) {
    for (int i = 0; i < t->siblings; i++) {
        const struct child_slot *s = &t->slots[i];
        if (s->ctl_fd != t->own.ctl_fd) close(s->ctl_fd);
        if (s->agent_fd >= 0 && s->agent_fd != t->own.agent_fd) close(s->agent_fd);
        if (s->serial.fd >= 0 && s->serial.fd != t->own.serial.fd) close(s->serial.fd);
    }
}

static void *child_takeover_main(void *arg) {
    struct child_takeover *t = arg;
    /* Not inherited across fork(2): this VMM adopts the children its own spawners leave behind. */
    prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);
    close_sibling_slots(t);
    if (t->stale_spawner_fd >= 0) close(t->stale_spawner_fd);
    close(t->stale_kick_fd);
    close(t->stale_stop_fd);
    if (t->v->board) board_close_stale(&t->board);
    vm_close_kvm_objects_later(t->stale_vm_fd, t->stale_vcpu_fd, t->stale_run, t->v->vm.run_size);
    t->child_main(t->v, t->own.ctl_fd, t->own.ctl_path);
    return NULL; /* not reached: child_main ends the process */
}

static void remember_takeover(struct vmm *v, const struct child_slot *slots, int index, int siblings, vmm_child_main child_main,
                              int spawner_fd) {
    takeover.v = v;
    takeover.child_main = child_main;
    takeover.own = slots[index];
    takeover.slots = slots;
    takeover.siblings = siblings;
    takeover.stale_vm_fd = v->vm.vm_fd;
    takeover.stale_vcpu_fd = v->vm.vcpu_fd;
    takeover.stale_kick_fd = v->cpu.kick_fd;
    takeover.stale_stop_fd = v->cpu.stop_fd;
    takeover.stale_spawner_fd = spawner_fd;
    takeover.stale_run = v->vm.run;
    /* Nothing to close unless board_child_rebind runs (a child whose restore failed never rebinds). */
    takeover.board = (struct board_stale){.agent_fd = -1, .agent_listen_fd = -1, .wake_fd = -1, .serial_fd = -1, .hungup_fd = -1,
                                          .net_fd = -1, .net_hungup_fd = -1};
}

static void unlink_own_sockets(const struct child_slot *own) {
    unlink(own->ctl_path);
    if (own->agent_fd >= 0) unlink(own->agent_path);
}

/*
 * Runs in the new child, right after fork(2) returned 0: rebuild the VM,
 * restore, rebind device descriptors, hand the control socket to a new
 * thread, and run the vCPU here.
 */
static _Noreturn void child_continue(struct vmm *v, const struct child_slot *slots, int index, int siblings,
                                     vmm_child_main child_main, int spawner_fd) {
    remember_takeover(v, slots, index, siblings, child_main, spawner_fd);
    const struct child_slot *own = &takeover.own;
    v->depth++;
    v->forks_done = 0;
    v->next_child_seq = 0;
    v->user_paused = 0;
    atomic_store(&v->cpu.exits, 0);
    v->cpu.timing.built_ns = v->cpu.timing.restored_ns = v->cpu.timing.first_run_ns = v->cpu.timing.first_exit_ns = 0;
    const char *failed = "vm";
    int ok = vm_build_kvm_objects(&v->vm) == 0;
    v->cpu.timing.built_ns = now_ns();
    ok = ok && state_restore(&v->vm, &v->state, &failed) == 0;
    int net_fd = -1;
    /* The child's own network process listens in its run directory: without it this child has no network, so it fails alone. */
    if (ok && v->board && v->board->net.present && (net_fd = unix_connect(own->net_path)) < 0) ok = 0, failed = "connect to the network socket";
    if (ok && v->board)
        board_child_rebind(v->board, own->agent_fd, own->agent_path, &own->serial, net_fd, own->net_path, &takeover.board);
    if (ok) v->cpu.ops->forked(v->cpu.guest);
    v->cpu.timing.restored_ns = now_ns();
    if (vcpu_init_sync(&v->cpu) < 0) ok = 0, failed = "vcpu-sync";
    if (!ok) child_fail(v, failed);
    v->cpu.thread = pthread_self(); /* before the new thread exists: its control channel may park us at once */
    pthread_t control;
    if (pthread_create(&control, NULL, child_takeover_main, &takeover) != 0) {
        unlink_own_sockets(own);
        _exit(1);
    }
    if (ok) vcpu_run_on_this_thread(&v->cpu);
    for (;;) pause();
}

static void close_slots(struct child_slot *slots, int n, int unlink_them) {
    for (int i = 0; i < n; i++) {
        struct child_slot *s = &slots[i];
        if (unlink_them) unlink_own_sockets(s);
        close(s->ctl_fd);
        if (s->agent_fd >= 0) close(s->agent_fd);
        if (s->serial.fd >= 0) close(s->serial.fd);
        s->ctl_fd = s->agent_fd = s->serial.fd = -1;
    }
}

/* A chosen path, else one in the child's run directory, else a default in the parent's own directory. */
static int set_slot_path(char *dst, size_t size, const char *chosen, const char *run_dir, const char *name, const char *default_dir,
                         unsigned seq, const char *suffix) {
    int n = chosen    ? snprintf(dst, size, "%s", chosen)
            : run_dir ? snprintf(dst, size, "%s/%s", run_dir, name)
                      : snprintf(dst, size, "%s/vmm-%d-%u%s", default_dir, (int)getpid(), seq, suffix);
    return n < 0 || (size_t)n >= size ? (errno = ENAMETOOLONG, -1) : 0;
}

/*
 * Control socket, agent socket (with a board) and serial log of one child,
 * all in the child's own run directory when one is given: a child must not
 * depend on its parent's directory, which goes when the parent does. A child
 * writes a serial log only where it is told to, or next to its socket when
 * its parent has one: never into its parent's.
 */
static int prepare_slot(struct vmm *v, const struct fork_paths *chosen, const char *default_dir, struct child_slot *s, char *err,
                        size_t errlen) {
    unsigned seq = v->next_child_seq++;
    *s = (struct child_slot){.ctl_fd = -1, .agent_fd = -1};
    serial_log_none(&s->serial, v->board ? v->board->serial.max_bytes : SERIAL_LOG_DEFAULT_MAX);
    const struct fork_paths none = {0};
    if (!chosen) chosen = &none;
    if (set_slot_path(s->ctl_path, sizeof s->ctl_path, chosen->socket, chosen->run_dir, "control.sock", default_dir, seq, ".sock") < 0 ||
        unix_listen(s->ctl_path, &s->ctl_fd) < 0)
        return snprintf(err, errlen, "cannot listen on child socket %s: %s", s->ctl_path, strerror(errno)), -1;
    if (!v->board) return 0;
    if (v->board->net.present && !chosen->run_dir) {
        snprintf(err, errlen, "this VM has a network: fork it with `forks COUNT RUN_DIR...`, each child connecting to RUN_DIR/%s",
                 BOARD_NET_SOCKET_NAME);
        return close_slots(s, 1, 1), -1;
    }
    if (v->board->net.present &&
        set_slot_path(s->net_path, sizeof s->net_path, NULL, chosen->run_dir, BOARD_NET_SOCKET_NAME, default_dir, seq, "") < 0) {
        snprintf(err, errlen, "child network socket path %s/%s is too long", chosen->run_dir, BOARD_NET_SOCKET_NAME);
        return close_slots(s, 1, 1), -1;
    }
    if (set_slot_path(s->agent_path, sizeof s->agent_path, chosen->agent_socket, chosen->run_dir, "agent.sock", default_dir, seq,
                      ".agent.sock") < 0 ||
        unix_listen(s->agent_path, &s->agent_fd) < 0) {
        snprintf(err, errlen, "cannot listen on child agent socket %s: %s", s->agent_path, strerror(errno));
        return close_slots(s, 1, 1), -1;
    }
    bool wanted = chosen->serial_log || chosen->run_dir || v->board->serial.fd >= 0;
    char log_path[SERIAL_LOG_PATH_MAX];
    if (wanted && (set_slot_path(log_path, sizeof log_path, chosen->serial_log, chosen->run_dir, "serial.log", default_dir, seq,
                                 ".serial.log") < 0 ||
                   serial_log_open(&s->serial, log_path, s->serial.max_bytes) < 0)) {
        snprintf(err, errlen, "cannot open child serial log %s: %s", log_path, strerror(errno));
        return close_slots(s, 1, 1), -1;
    }
    return 0;
}

static int prepare_slots(struct vmm *v, const struct fork_request *req, struct child_slot *slots, char *err, size_t errlen) {
    for (int i = 0; i < req->count; i++) {
        if (prepare_slot(v, req->paths ? &req->paths[i] : NULL, req->default_dir, &slots[i], err, errlen) < 0) {
            close_slots(slots, i, 1);
            return -1;
        }
    }
    return 0;
}

/* Park (unless the user already paused the VM) and capture; on failure the vCPU is left as it was. */
static int stop_and_capture(struct vmm *v, int64_t t0, int64_t *park_ns, int64_t *capture_ns, char *err, size_t errlen) {
    if (!v->user_paused && vcpu_park(&v->cpu) < 0) {
        if (errno == ETIMEDOUT) snprintf(err, errlen, "vcpu did not stop in time: nothing forked");
        else snprintf(err, errlen, "vcpu is stopped (%s): nothing to fork", v->cpu.stop_reason);
        return -1;
    }
    int64_t parked = now_ns();
    *park_ns = parked - t0;
    const char *failed = "?";
    if (state_capture(&v->vm, &v->state, &failed) < 0) {
        snprintf(err, errlen, "state capture failed at %s: %s", failed, strerror(errno));
        if (!v->user_paused) vcpu_resume(&v->cpu);
        return -1;
    }
    *capture_ns = now_ns() - parked;
    return 0;
}

/* ---- the spawner ------------------------------------------------------------ */

/* One line of the spawner's report: a child (pid > 0), a failed fork(2) (pid 0, errno), or the end (pid -1, its time). */
struct spawn_record {
    int32_t pid;
    int32_t error;
    int64_t ns;
};

_Static_assert(sizeof(struct spawn_record) == sizeof(((struct fork_report *)0)->record), "record buffer fits one record");

static void spawner_report(int fd, int32_t pid, int32_t error, int64_t ns) {
    struct spawn_record r = {pid, error, ns};
    /* 16 bytes into a pipe nobody else writes: atomic, and far below its capacity for 257 records. */
    while (write(fd, &r, sizeof r) < 0 && errno == EINTR) {
    }
}

/*
 * The frozen copy of the parent: forks every child from the state the
 * parent captured, reports them, and exits. Slots it could not hand to a
 * child are unlinked here; the children adopt their own.
 */
static _Noreturn void spawner_main(struct vmm *v, const struct fork_request *req, struct child_slot *slots, int report_fd) {
    int64_t t0 = now_ns();
    int made = 0;
    for (; made < req->count; made++) {
        v->cpu.timing.fork_ns = now_ns(); /* the child inherits this: its time zero */
        pid_t pid = fork();
        if (pid == 0) child_continue(v, slots, made, req->count, req->child_main, report_fd);
        if (pid < 0) {
            spawner_report(report_fd, 0, errno, 0);
            break;
        }
        spawner_report(report_fd, pid, 0, 0);
    }
    for (int i = made; i < req->count; i++) unlink_own_sockets(&slots[i]);
    spawner_report(report_fd, -1, 0, now_ns() - t0);
    _exit(0);
}

static void list_child(struct fork_report *rep, int i, const struct child_slot *s) {
    memcpy(rep->child[i].socket_path, s->ctl_path, sizeof rep->child[i].socket_path);
    memcpy(rep->child[i].agent_path, s->agent_fd >= 0 ? s->agent_path : "", sizeof rep->child[i].agent_path);
}

/* The paths of children the spawner never made: bound by the parent, now nobody's. */
static void unlink_unmade(struct fork_report *rep) {
    for (int i = rep->count; i < rep->wanted; i++) {
        unlink(rep->child[i].socket_path);
        if (rep->child[i].agent_path[0]) unlink(rep->child[i].agent_path);
    }
}

static void end_spawner(struct fork_report *rep) {
    close(rep->spawner_fd);
    rep->spawner_fd = -1;
}

int vmm_fork_collect(struct vmm *v, struct fork_report *rep) {
    for (;;) {
        ssize_t n = read(rep->spawner_fd, rep->record + rep->partial, sizeof rep->record - rep->partial);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && errno == EAGAIN) return 1;
        if (n <= 0) { /* the spawner is gone without its last record */
            if (!rep->error[0]) snprintf(rep->error, sizeof rep->error, "the spawner ended after %d of %d children", rep->count, rep->wanted);
            unlink_unmade(rep);
            end_spawner(rep);
            v->forks_done += (uint64_t)rep->count;
            return -1;
        }
        rep->partial += (size_t)n;
        if (rep->partial < sizeof rep->record) continue;
        rep->partial = 0;
        struct spawn_record r;
        memcpy(&r, rep->record, sizeof r);
        if (r.pid > 0 && rep->count < rep->wanted) {
            rep->child[rep->count++].pid = r.pid;
        } else if (r.pid == 0) {
            snprintf(rep->error, sizeof rep->error, "fork: %s", strerror(r.error));
        } else if (r.pid < 0) {
            rep->spawn_ns = r.ns;
            end_spawner(rep);
            v->forks_done += (uint64_t)rep->count;
            if (rep->count == rep->wanted) return 0;
            if (!rep->error[0]) snprintf(rep->error, sizeof rep->error, "the spawner made %d of %d children", rep->count, rep->wanted);
            return -1;
        }
    }
}

void vmm_fork_abandon(struct vmm *v, struct fork_report *rep) {
    if (rep->spawner_pid > 0) kill(rep->spawner_pid, SIGKILL);
    if (vmm_fork_collect(v, rep) != 1) return; /* it had finished after all */
    if (!rep->error[0]) snprintf(rep->error, sizeof rep->error, "the spawner was stopped after %d of %d children", rep->count, rep->wanted);
    unlink_unmade(rep);
    end_spawner(rep);
    v->forks_done += (uint64_t)rep->count;
}

/* ---- forks ------------------------------------------------------------------------ */

int vmm_fork(struct vmm *v, const struct fork_request *req, struct fork_report *rep, char *err, size_t errlen) {
    static struct child_slot slots[VMM_MAX_FORK_BATCH];
    memset(rep, 0, sizeof *rep);
    rep->spawner_fd = rep->spawner_pid = -1;
    if (req->count < 1 || req->count > VMM_MAX_FORK_BATCH) return snprintf(err, errlen, "fork count out of range"), -1;
    rep->wanted = req->count;
    int report[2] = {-1, -1};
    /* The spawner's report pipe: only the parent's end is non-blocking (it reads from its poll loop). */
    if (req->count > 1 && (pipe2(report, O_CLOEXEC) < 0 || fcntl(report[0], F_SETFL, O_NONBLOCK) < 0)) {
        snprintf(err, errlen, "cannot make the spawner's pipe: %s", strerror(errno));
        if (report[0] >= 0) close(report[0]), close(report[1]);
        return -1;
    }
    if (prepare_slots(v, req, slots, err, errlen) < 0) {
        if (report[0] >= 0) close(report[0]), close(report[1]);
        return -1;
    }
    for (int i = 0; i < req->count; i++) list_child(rep, i, &slots[i]);
    int64_t t0 = now_ns();
    if (stop_and_capture(v, t0, &rep->park_ns, &rep->capture_ns, err, errlen) < 0) {
        if (report[0] >= 0) close(report[0]), close(report[1]);
        return close_slots(slots, req->count, 1), -1;
    }
    int64_t own_fork_ns = v->cpu.timing.fork_ns, forked = now_ns();
    v->cpu.timing.fork_ns = forked; /* a direct child inherits this: its time zero */
    pid_t pid = fork();
    if (pid == 0 && req->count == 1) child_continue(v, slots, 0, 1, req->child_main, -1);
    if (pid == 0) {
        close(report[0]);
        spawner_main(v, req, slots, report[1]);
    }
    int saved = errno;
    rep->fork_ns = now_ns() - forked;
    v->cpu.timing.fork_ns = own_fork_ns;
    if (!v->user_paused) vcpu_resume(&v->cpu);
    rep->pause_ns = now_ns() - t0;
    if (report[1] >= 0) close(report[1]);
    if (pid < 0) {
        if (report[0] >= 0) close(report[0]);
        close_slots(slots, req->count, 1);
        return snprintf(err, errlen, "fork: %s", strerror(saved)), -1;
    }
    close_slots(slots, req->count, 0); /* the child, or the spawner, holds them now */
    if (req->count == 1) {
        rep->child[0].pid = pid;
        rep->count = 1;
        v->forks_done++;
        return 0;
    }
    rep->spawner_fd = report[0];
    rep->spawner_pid = pid;
    return 1;
}

/*
 * A snapshot to disk is a fork whose one child never runs the VM: it writes
 * its copy-on-write view of RAM and the captured state to `dir` and exits
 * (snapshot.c). The parent pauses exactly as long as for a fork and replies
 * at once with the writer's pid; the writer reports in dir/done.
 */
int vmm_snapshot(struct vmm *v, const char *dir, struct snapshot_report *rep, char *err, size_t errlen) {
    memset(rep, 0, sizeof *rep);
    int64_t t0 = now_ns();
    if (stop_and_capture(v, t0, &rep->park_ns, &rep->capture_ns, err, errlen) < 0) return -1;
    int64_t forked = now_ns();
    pid_t pid = fork();
    if (pid == 0) snapshot_writer_main(v, dir);
    int saved = errno;
    rep->fork_ns = now_ns() - forked;
    if (!v->user_paused) vcpu_resume(&v->cpu);
    rep->pause_ns = now_ns() - t0;
    if (pid < 0) return snprintf(err, errlen, "fork: %s", strerror(saved)), -1;
    rep->writer_pid = pid;
    return 0;
}
