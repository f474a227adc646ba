/*
 * The fork core.
 *
 * Parent: park the vCPU at a safe point, capture the machine state into
 * ordinary memory, fork(2) once per child, resume. Only the forking (control)
 * thread exists in a child, and its copy of guest RAM is copy-on-write.
 *
 * Child: the inherited KVM VM belongs to the parent's process and cannot be
 * used, so it builds a new VM over the same host address of guest RAM and
 * restores the captured state; then the forking thread runs the vCPU itself
 * and a new thread serves control on the listening socket the parent
 * prepared before the pause (so it accepts connections the moment fork
 * returns). Closing inherited fds and stale KVM objects happens on that
 * control thread, off the path to a running child.
 */
#include "vmm.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static void child_fail(struct vmm *v, const char *step) {
    snprintf(v->cpu.stop_reason, sizeof v->cpu.stop_reason, "restore-failed");
    snprintf(v->cpu.stop_detail, sizeof v->cpu.stop_detail, "%s: %s", step, strerror(errno));
    atomic_store(&v->cpu.phase, VCPU_STOPPED);
}

static void reset_child_counters(struct vcpu *cpu) {
    atomic_store(&cpu->exits, 0);
    atomic_store(&cpu->heartbeats, 0);
    atomic_store(&cpu->reports, 0);
    atomic_store(&cpu->last_report, 0);
    cpu->timing.built_ns = cpu->timing.restored_ns = cpu->timing.first_run_ns = cpu->timing.first_exit_ns = 0;
}

/* What the child's new control thread tidies up, after the vCPU already runs. */
static struct child_takeover {
    struct vmm *v;
    int listen_fd;
    char path[108];
    int sibling_fds[VMM_MAX_FORK_BATCH];
    int siblings;
    int stale_vm_fd, stale_vcpu_fd, stale_kick_fd;
    struct kvm_run *stale_run;
} takeover;

static void *child_control_main(void *arg) {
    struct child_takeover *t = arg;
    for (int i = 0; i < t->siblings; i++)
        if (t->sibling_fds[i] != t->listen_fd) close(t->sibling_fds[i]);
    control_drop_inherited(&t->v->ctl, t->listen_fd, t->path);
    close(t->stale_kick_fd);
    vm_close_kvm_objects_later(t->stale_vm_fd, t->stale_vcpu_fd, t->stale_run, t->v->vm.run_size);
    exit(control_serve(t->v));
}

static void remember_takeover(struct vmm *v, int listen_fd, const char *path, const int *sibling_fds, int siblings) {
    takeover.v = v;
    takeover.listen_fd = listen_fd;
    snprintf(takeover.path, sizeof takeover.path, "%s", path);
    memcpy(takeover.sibling_fds, sibling_fds, (size_t)siblings * sizeof *sibling_fds);
    takeover.siblings = siblings;
    takeover.stale_vm_fd = v->vm.vm_fd;
    takeover.stale_vcpu_fd = v->vm.vcpu_fd;
    takeover.stale_kick_fd = v->cpu.kick_fd;
    takeover.stale_run = v->vm.run;
}

/*
 * Runs in the new child, right after fork(2) returned 0: rebuild the VM,
 * restore, hand the control socket to a new thread, and run the vCPU here.
 */
static _Noreturn void child_continue(struct vmm *v, int listen_fd, const char *path, const int *sibling_fds, int siblings) {
    remember_takeover(v, listen_fd, path, sibling_fds, siblings);
    v->depth++;
    v->forks_done = 0;
    v->user_paused = 0;
    reset_child_counters(&v->cpu);
    const char *failed = "vm";
    int ok = vm_build_kvm_objects(&v->vm) == 0;
    v->cpu.timing.built_ns = now_ns();
    ok = ok && state_restore(&v->vm, &v->state, &failed) == 0;
    v->cpu.timing.restored_ns = now_ns();
    if (vcpu_init_sync(&v->cpu) < 0) ok = 0, failed = "vcpu-sync";
    if (!ok) child_fail(v, failed);
    v->cpu.thread = pthread_self(); /* before the control thread exists: it may park us at once */
    pthread_t control;
    if (pthread_create(&control, NULL, child_control_main, &takeover) != 0) {
        unlink(path);
        _exit(1);
    }
    if (ok) vcpu_run_on_this_thread(&v->cpu);
    for (;;) pause();
}

static void close_sockets(int *fds, char (*paths)[108], int n, int unlink_them) {
    for (int i = 0; i < n; i++) {
        if (fds[i] < 0) continue;
        close(fds[i]);
        if (unlink_them) unlink(paths[i]);
        fds[i] = -1;
    }
}

static int prepare_sockets(struct vmm *v, int count, const char *const *paths, int *fds, char (*out)[108],
                           char *err, size_t errlen) {
    for (int i = 0; i < count; i++) {
        int n;
        if (paths && paths[i])
            n = snprintf(out[i], 108, "%s", paths[i]);
        else
            n = snprintf(out[i], 108, "%s/vmm-%d-%u.sock", v->ctl.socket_dir, (int)getpid(), v->ctl.next_child_seq++);
        if (n < 0 || n >= 108 || control_listen(out[i], &fds[i]) < 0) {
            snprintf(err, errlen, "cannot listen on child socket %s: %s", out[i], n >= 108 ? "path too long" : strerror(errno));
            close_sockets(fds, out, i, 1);
            return -1;
        }
    }
    return 0;
}

/* Park (unless the user already paused the VM) and capture; on failure the vCPU is left as it was. */
static int stop_and_capture(struct vmm *v, struct fork_report *rep, int64_t t0, char *err, size_t errlen) {
    if (!v->user_paused && vcpu_park(&v->cpu) < 0) {
        snprintf(err, errlen, "vcpu is stopped (%s): nothing to fork", v->cpu.stop_reason);
        return -1;
    }
    int64_t parked = now_ns();
    rep->park_ns = parked - t0;
    const char *failed = "?";
    if (state_capture(&v->vm, &v->state, &failed) < 0) {
        snprintf(err, errlen, "state capture failed at %s: %s", failed, strerror(errno));
        if (!v->user_paused) vcpu_resume(&v->cpu);
        return -1;
    }
    rep->capture_ns = now_ns() - parked;
    return 0;
}

int vmm_fork(struct vmm *v, int count, const char *const *paths, struct fork_report *rep, char *err, size_t errlen) {
    int fds[VMM_MAX_FORK_BATCH];
    char child_paths[VMM_MAX_FORK_BATCH][108];
    memset(rep, 0, sizeof *rep);
    if (count < 1 || count > VMM_MAX_FORK_BATCH) return snprintf(err, errlen, "fork count out of range"), -1;
    if (prepare_sockets(v, count, paths, fds, child_paths, err, errlen) < 0) return -1;
    int64_t t0 = now_ns();
    if (stop_and_capture(v, rep, t0, err, errlen) < 0) return close_sockets(fds, child_paths, count, 1), -1;
    int64_t own_fork_ns = v->cpu.timing.fork_ns, forks_started = now_ns();
    int made = 0;
    for (; made < count; made++) {
        v->cpu.timing.fork_ns = now_ns(); /* the child inherits this: its time zero */
        pid_t pid = fork();
        if (pid == 0) child_continue(v, fds[made], child_paths[made], fds, count);
        if (pid < 0) {
            snprintf(err, errlen, "fork: %s", strerror(errno));
            break;
        }
        rep->child[made].pid = pid;
        memcpy(rep->child[made].socket_path, child_paths[made], 108);
    }
    v->cpu.timing.fork_ns = own_fork_ns;
    rep->fork_ns = now_ns() - forks_started;
    if (!v->user_paused) vcpu_resume(&v->cpu);
    rep->pause_ns = now_ns() - t0;
    close_sockets(fds, child_paths, made, 0);                         /* the children own these now */
    close_sockets(fds + made, child_paths + made, count - made, 1); /* never handed to a child */
    rep->count = made;
    v->forks_done += (uint64_t)made;
    return made == count ? 0 : -1;
}
