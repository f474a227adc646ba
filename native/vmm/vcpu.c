/*
 * The vCPU thread: runs KVM_RUN, handles guest exits, and parks on request.
 *
 * Parking protocol (the only way the vCPU stops for pause or fork):
 *   control thread: park_requested = 1; run->immediate_exit = 1; kick; signal
 *   vCPU thread:    KVM_RUN returns EINTR -> parked, waits for a resume ticket
 *   control thread: vcpu_resume clears immediate_exit (the vCPU is parked, so
 *                   out of KVM_RUN) and hands out the ticket
 * KVM completes a pending I/O or MMIO exit only on the next KVM_RUN, so
 * parking only after an EINTR return means the captured state never holds
 * a half-done instruction. immediate_exit is only ever cleared while the vCPU
 * is parked: a signal may be spent while the vCPU thread is outside KVM_RUN,
 * and then immediate_exit is what still makes the next KVM_RUN return EINTR.
 * A park that does not happen in PARK_TIMEOUT_MS is withdrawn, so the control
 * thread (and with it status and the agent socket) never waits for ever.
 *
 * Everything the guest writes (port numbers, sizes, data) is untrusted.
 */
#include "vmm.h"

#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>

#define KICK_SIGNAL SIGUSR1
#define PARK_TIMEOUT_MS 5000
#define PARK_RETRY_MS 20 /* how often a park request re-sends the kick signal */

static void on_kick_signal(int sig) {
    (void)sig; /* only here to make KVM_RUN return EINTR */
}

int vcpu_init_sync(struct vcpu *cpu) {
    /* Also called in a forked child, whose copies of these may be mid-use by a thread that no longer exists. */
    if (pthread_mutex_init(&cpu->lock, NULL) != 0) return -1;
    pthread_condattr_t attr; /* timed waits on CLOCK_MONOTONIC: wall-clock steps must not stretch a park */
    if (pthread_condattr_init(&attr) != 0 || pthread_condattr_setclock(&attr, CLOCK_MONOTONIC) != 0) return -1;
    int r = pthread_cond_init(&cpu->cond, &attr);
    pthread_condattr_destroy(&attr);
    if (r != 0) return -1;
    atomic_store(&cpu->park_requested, 0);
    cpu->parked = 0;
    cpu->resume_ticket = 0;
    cpu->thread_started = 0;
    cpu->kick_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (cpu->kick_fd < 0) return -1;
    cpu->stop_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (cpu->stop_fd < 0) return -1;
    struct sigaction sa = {.sa_handler = on_kick_signal}; /* no SA_RESTART: we want the EINTR */
    sigemptyset(&sa.sa_mask);
    return sigaction(KICK_SIGNAL, &sa, NULL);
}

static void stop_for_good(struct vcpu *cpu, const char *reason, const char *detail) {
    pthread_mutex_lock(&cpu->lock);
    snprintf(cpu->stop_reason, sizeof cpu->stop_reason, "%s", reason);
    snprintf(cpu->stop_detail, sizeof cpu->stop_detail, "%s", detail);
    atomic_store(&cpu->phase, VCPU_STOPPED);
    pthread_cond_broadcast(&cpu->cond);
    pthread_mutex_unlock(&cpu->lock);
    uint64_t one = 1;
    if (write(cpu->stop_fd, &one, sizeof one) < 0) { /* the control thread also sees the phase on its next request */
    }
}

static void park_until_resumed(struct vcpu *cpu) {
    pthread_mutex_lock(&cpu->lock);
    if (!atomic_load(&cpu->park_requested)) { /* withdrawn by a park that timed out */
        pthread_mutex_unlock(&cpu->lock);
        return;
    }
    int ticket = cpu->resume_ticket;
    cpu->parked = 1;
    atomic_store(&cpu->phase, VCPU_PARKED);
    pthread_cond_broadcast(&cpu->cond);
    while (cpu->resume_ticket == ticket) pthread_cond_wait(&cpu->cond, &cpu->lock);
    cpu->parked = 0;
    atomic_store(&cpu->phase, VCPU_RUNNING);
    pthread_mutex_unlock(&cpu->lock);
}

void vcpu_idle(struct vcpu *cpu) {
    if (cpu->idle_us == 0 || atomic_load(&cpu->park_requested)) return;
    struct pollfd p = {.fd = cpu->kick_fd, .events = POLLIN};
    int timeout_ms = (int)((cpu->idle_us + 999) / 1000);
    if (poll(&p, 1, timeout_ms) > 0) {
        uint64_t drained;
        if (read(cpu->kick_fd, &drained, sizeof drained) < 0) { /* already drained by a racing wakeup */
        }
    }
}

static int io_is_sane(const struct kvm_run *run, size_t run_size) {
    uint64_t bytes = (uint64_t)run->io.size * run->io.count;
    if (run->io.size != 1 && run->io.size != 2 && run->io.size != 4) return 0;
    return run->io.data_offset < run_size && bytes <= run_size - run->io.data_offset;
}

static int guest_reset(struct vcpu *cpu) {
    return stop_for_good(cpu, "shutdown", "guest requested a reset"), -1;
}

/* String I/O (rep ins/outs) arrives as count items of size bytes each: one access of the guest's machine per item. */
static int handle_io(struct vcpu *cpu) {
    struct kvm_run *run = cpu->vm->run;
    if (!io_is_sane(run, cpu->vm->run_size)) return stop_for_good(cpu, "bad-io-exit", "size/offset out of range"), -1;
    uint8_t *data = (uint8_t *)run + run->io.data_offset;
    bool is_write = run->io.direction == KVM_EXIT_IO_OUT;
    for (uint32_t i = 0; i < run->io.count; i++, data += run->io.size)
        if (cpu->ops->io(cpu->guest, run->io.port, is_write, data, run->io.size) == GUEST_EXIT_RESET) return guest_reset(cpu);
    return 0;
}

static int handle_mmio(struct vcpu *cpu) {
    struct kvm_run *run = cpu->vm->run;
    if (run->mmio.len == 0 || run->mmio.len > sizeof run->mmio.data) return stop_for_good(cpu, "bad-mmio-exit", "length out of range"), -1;
    if (cpu->ops->mmio(cpu->guest, run->mmio.phys_addr, run->mmio.is_write, run->mmio.data, run->mmio.len) == GUEST_EXIT_RESET)
        return guest_reset(cpu);
    return 0;
}

static int handle_exit(struct vcpu *cpu) {
    struct kvm_run *run = cpu->vm->run;
    char detail[160];
    switch (run->exit_reason) {
    case KVM_EXIT_IO:
        return handle_io(cpu);
    case KVM_EXIT_MMIO:
        return handle_mmio(cpu);
    case KVM_EXIT_INTR:
    case KVM_EXIT_IRQ_WINDOW_OPEN:
        return 0;
    case KVM_EXIT_HLT:
        return stop_for_good(cpu, "halt", "guest halted with no way to wake"), -1;
    case KVM_EXIT_SHUTDOWN:
        return stop_for_good(cpu, "shutdown", "triple fault or guest shutdown"), -1;
    case KVM_EXIT_INTERNAL_ERROR:
        snprintf(detail, sizeof detail, "suberror %u", run->internal.suberror);
        return stop_for_good(cpu, "internal-error", detail), -1;
    case KVM_EXIT_FAIL_ENTRY:
        snprintf(detail, sizeof detail, "hardware entry failure reason 0x%llx",
                 (unsigned long long)run->fail_entry.hardware_entry_failure_reason);
        return stop_for_good(cpu, "fail-entry", detail), -1;
    default:
        snprintf(detail, sizeof detail, "exit reason %u", run->exit_reason);
        return stop_for_good(cpu, "unexpected-exit", detail), -1;
    }
}

static void note_first_exit(struct vcpu *cpu) {
    if (cpu->timing.first_exit_ns == 0) cpu->timing.first_exit_ns = now_ns();
}

static void *vcpu_main(void *arg) {
    struct vcpu *cpu = arg;
    cpu->timing.first_run_ns = now_ns();
    for (;;) {
        int r = ioctl(cpu->vm->vcpu_fd, KVM_RUN, 0);
        if (r < 0 && (errno == EINTR || errno == EAGAIN)) {
            if (atomic_load(&cpu->park_requested)) park_until_resumed(cpu);
            continue;
        }
        if (r < 0) {
            char detail[160];
            snprintf(detail, sizeof detail, "KVM_RUN: %s", strerror(errno));
            return stop_for_good(cpu, "kvm-error", detail), NULL;
        }
        note_first_exit(cpu);
        atomic_fetch_add(&cpu->exits, 1);
        if (handle_exit(cpu) < 0) return NULL;
    }
}

int vcpu_start(struct vcpu *cpu) {
    atomic_store(&cpu->phase, VCPU_RUNNING);
    /* The vCPU thread must take the kick signal; the control thread must not (it would only interrupt poll). */
    sigset_t kick, old;
    sigemptyset(&kick);
    sigaddset(&kick, KICK_SIGNAL);
    pthread_sigmask(SIG_UNBLOCK, &kick, &old);
    int r = pthread_create(&cpu->thread, NULL, vcpu_main, cpu);
    pthread_sigmask(SIG_BLOCK, &kick, NULL);
    if (r != 0) return errno = r, -1;
    cpu->thread_started = 1;
    return 0;
}

/*
 * In a forked child the thread that called fork(2) is the only one left; it
 * becomes the vCPU thread at once (no wait for a new thread to be scheduled).
 * It never returns: after a fatal guest exit it just sleeps, the process
 * lives on for its control thread to report the error.
 */
void vcpu_run_on_this_thread(struct vcpu *cpu) {
    cpu->thread = pthread_self();
    cpu->thread_started = 1;
    atomic_store(&cpu->phase, VCPU_RUNNING);
    sigset_t kick;
    sigemptyset(&kick);
    sigaddset(&kick, KICK_SIGNAL);
    pthread_sigmask(SIG_UNBLOCK, &kick, NULL);
    vcpu_main(cpu);
    for (;;) pause();
}

void vcpu_kick(struct vcpu *cpu) {
    uint64_t one = 1;
    if (write(cpu->kick_fd, &one, sizeof one) < 0) { /* counter full means a wakeup is pending anyway */
    }
}

static struct timespec deadline_after_ms(int ms) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    ts.tv_sec += ms / 1000;
    ts.tv_nsec += (long)(ms % 1000) * 1000000;
    if (ts.tv_nsec >= 1000000000) ts.tv_sec++, ts.tv_nsec -= 1000000000;
    return ts;
}

/* Under cpu->lock: gives up a park that did not happen, so a late EINTR does not park with nobody to resume. */
static void withdraw_park(struct vcpu *cpu) {
    atomic_store(&cpu->park_requested, 0);
    cpu->vm->run->immediate_exit = 0;
}

int vcpu_park(struct vcpu *cpu) {
    if (atomic_load(&cpu->phase) == VCPU_STOPPED) return errno = ESRCH, -1;
    atomic_store(&cpu->park_requested, 1);
    cpu->vm->run->immediate_exit = 1;
    vcpu_kick(cpu);
    pthread_mutex_lock(&cpu->lock);
    int64_t give_up = now_ns() + (int64_t)PARK_TIMEOUT_MS * 1000000;
    while (!cpu->parked && atomic_load(&cpu->phase) != VCPU_STOPPED && now_ns() < give_up) {
        /* Re-sent on every round: cheap, and a vCPU blocked outside KVM_RUN is interrupted again once it is back. */
        pthread_kill(cpu->thread, KICK_SIGNAL);
        struct timespec until = deadline_after_ms(PARK_RETRY_MS);
        pthread_cond_timedwait(&cpu->cond, &cpu->lock, &until);
    }
    int parked = cpu->parked;
    if (!parked) withdraw_park(cpu);
    pthread_mutex_unlock(&cpu->lock);
    if (!parked) errno = atomic_load(&cpu->phase) == VCPU_STOPPED ? ESRCH : ETIMEDOUT;
    return parked ? 0 : -1;
}

void vcpu_resume(struct vcpu *cpu) {
    pthread_mutex_lock(&cpu->lock);
    atomic_store(&cpu->park_requested, 0);
    /* Cleared here, while the vCPU is parked and out of KVM_RUN: if the vCPU thread cleared it after waking,
       it could wipe out the next park's request, whose signal may already be spent, and that park would wait for ever. */
    cpu->vm->run->immediate_exit = 0;
    cpu->resume_ticket++;
    pthread_cond_broadcast(&cpu->cond);
    pthread_mutex_unlock(&cpu->lock);
}
