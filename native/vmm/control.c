/*
 * The control channel: a unix stream socket per VMM process, one request
 * per line ("verb arg arg\n"), one JSON object per line back. The protocol
 * is in docs/vmm.md. Input is parsed defensively: lines are capped at
 * CONTROL_LINE_MAX, numbers must parse completely, guest ranges are checked.
 *
 * The control thread calls fork(2). In a child that thread becomes the vCPU
 * thread and a new thread serves the child's own socket (serve_forked_child,
 * handed to the fork core). A fork of many children is answered once the
 * spawner has reported them all; meanwhile this thread goes on serving
 * everyone else, and the requesting client's next lines wait their turn.
 */
#include "vmm.h"

#include <errno.h>
#include <inttypes.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <unistd.h>

#define REPLY_MAX (128 * 1024)
#define MAX_ARGS (2 + VMM_MAX_FORK_BATCH) /* forks COUNT DIR... */
/* A spawner forking 256 children takes well under a second on hardware, seconds under emulation. */
#define SPAWN_TIMEOUT_MS 60000

enum line_outcome { LINE_OK, LINE_CLOSE, LINE_QUIT, LINE_DEFERRED };

static int signal_fd = -1;

static void set_path(struct control *c, const char *path) {
    snprintf(c->socket_path, sizeof c->socket_path, "%s", path);
    snprintf(c->socket_dir, sizeof c->socket_dir, "%s", path);
    char *slash = strrchr(c->socket_dir, '/');
    if (slash && slash != c->socket_dir) *slash = '\0';
    else if (slash) slash[1] = '\0';
    else strcpy(c->socket_dir, ".");
}

int control_init(struct control *c, int listen_fd, const char *path) {
    memset(c, 0, sizeof *c);
    c->listen_fd = listen_fd;
    set_path(c, path);
    /* Termination requests arrive on a signalfd so that only the control thread sees them. */
    sigset_t mask;
    sigemptyset(&mask);
    sigaddset(&mask, SIGTERM);
    sigaddset(&mask, SIGINT);
    sigaddset(&mask, SIGHUP);
    sigaddset(&mask, SIGUSR1); /* the vCPU kick signal: only the vCPU thread takes it */
    pthread_sigmask(SIG_BLOCK, &mask, NULL);
    sigdelset(&mask, SIGUSR1);
    signal_fd = signalfd(-1, &mask, SFD_CLOEXEC | SFD_NONBLOCK);
    return signal_fd < 0 ? -1 : 0;
}

/* A fork still waiting for its spawner is dropped with its client; the spawner and its children carry on. */
static void drop_client(struct control *c, int i) {
    struct control_client *cl = c->client[i];
    close(cl->fd);
    if (cl->pending) {
        if (cl->pending->spawner_fd >= 0) close(cl->pending->spawner_fd);
        free(cl->pending);
    }
    free(cl);
    c->client[i] = NULL;
}

/* ---- parsing ------------------------------------------------------------ */

static int split_args(char *line, char **argv) {
    int argc = 0;
    for (char *tok = strtok(line, " \t\r"); tok; tok = strtok(NULL, " \t\r")) {
        if (argc == MAX_ARGS) return -1;
        argv[argc++] = tok;
    }
    return argc;
}

/* ---- replies ------------------------------------------------------------ */

/*
 * Every reply is built by appending to one bounded buffer (util.c). An
 * append that would not fit marks the reply as overflowed; the request is
 * then answered with an error instead (handle_line), so no reply is ever
 * cut off mid-JSON. The largest real reply, `forks 256` with every path at
 * its longest, needs ~70 KiB.
 */
static char out_storage[REPLY_MAX];
static struct text_buf out = {.data = out_storage, .cap = sizeof out_storage};

void control_reply_error(struct text_buf *t, const char *message) {
    tb_reset(t);
    tb_printf(t, "{\"ok\":false,\"error\":");
    tb_json_string(t, message);
    tb_printf(t, "}");
}

void control_reply_ok(struct text_buf *t) {
    tb_reset(t);
    tb_printf(t, "{\"ok\":true}");
}

static const char *phase_name(int phase, int user_paused) {
    if (phase == VCPU_STOPPED) return "stopped";
    return user_paused ? "paused" : "running";
}

static void cmd_status(struct vmm *v) {
    struct vcpu *cpu = &v->cpu;
    int phase = atomic_load(&cpu->phase);
    tb_printf(&out, "{\"ok\":true,\"pid\":%d,\"ppid\":%d,\"depth\":%d,\"state\":\"%s\",\"reason\":", (int)getpid(), (int)getppid(),
              v->depth, phase_name(phase, v->user_paused));
    tb_json_string(&out, phase == VCPU_STOPPED ? cpu->stop_reason : "");
    tb_printf(&out, ",\"detail\":");
    tb_json_string(&out, phase == VCPU_STOPPED ? cpu->stop_detail : "");
    tb_printf(&out,
              ",\"exits\":%" PRIu64 ",\"forks\":%" PRIu64 ",\"msrs\":%u,\"msrsNotRestored\":%u,"
              "\"timing\":{\"forkNs\":%" PRId64 ",\"builtNs\":%" PRId64 ",\"restoredNs\":%" PRId64 ",\"firstRunNs\":%" PRId64
              ",\"firstExitNs\":%" PRId64 "},\"guest\":",
              (uint64_t)atomic_load(&cpu->exits), v->forks_done, v->vm.msr_count, v->state.msrs_not_restored, cpu->timing.fork_ns,
              cpu->timing.built_ns, cpu->timing.restored_ns, cpu->timing.first_run_ns, cpu->timing.first_exit_ns);
    tb_json_string(&out, cpu->ops->name);
    cpu->ops->status(cpu->guest, &out);
    tb_printf(&out, "}");
}

/* Why vcpu_park failed, for the reply. */
static void park_error(void) {
    control_reply_error(&out, errno == ETIMEDOUT ? "vcpu did not stop in time" : "vcpu is stopped");
}

static void cmd_pause(struct vmm *v) {
    if (v->user_paused) return control_reply_ok(&out);
    if (vcpu_park(&v->cpu) < 0) return park_error();
    v->user_paused = 1;
    control_reply_ok(&out);
}

static void cmd_resume(struct vmm *v) {
    if (v->user_paused) vcpu_resume(&v->cpu);
    v->user_paused = 0;
    control_reply_ok(&out);
}

static uint64_t captured_msr(const struct machine_state *st, uint32_t count, uint32_t index) {
    for (uint32_t i = 0; i < count; i++)
        if (st->msrs->entries[i].index == index) return st->msrs->entries[i].data;
    return 0;
}

/* A summary of the full machine state, captured now: lets tests compare a parent with its child. */
static void cmd_state(struct vmm *v) {
    if (!v->user_paused && vcpu_park(&v->cpu) < 0) return park_error();
    const char *failed = "?";
    int r = state_capture(&v->vm, &v->state, &failed);
    if (!v->user_paused) vcpu_resume(&v->cpu);
    if (r < 0) return control_reply_error(&out, failed);
    const struct machine_state *st = &v->state;
    const struct kvm_sregs2 *s2 = &st->vcpu.sregs2;
    const struct kvm_sregs *s1 = &st->vcpu.sregs;
    uint64_t cr3 = v->vm.has_sregs2 ? s2->cr3 : s1->cr3, efer = v->vm.has_sregs2 ? s2->efer : s1->efer;
    uint64_t apic_base = v->vm.has_sregs2 ? s2->apic_base : s1->apic_base;
    unsigned cs = v->vm.has_sregs2 ? s2->cs.selector : s1->cs.selector;
    const struct kvm_pit_channel_state *pit0 = &st->vm.pit.channels[0];
    uint32_t lvt0;
    memcpy(&lvt0, st->vcpu.lapic.regs + 0x350, sizeof lvt0);
    tb_printf(&out,
              "{\"ok\":true,\"rip\":%llu,\"rflags\":%llu,\"cs\":%u,\"cr3\":%" PRIu64 ",\"efer\":%" PRIu64 ",\"apicBase\":%" PRIu64
              ",\"tsc\":%" PRIu64 ",\"tscOffset\":%" PRIu64 ",\"clockNs\":%llu,\"pit0\":{\"count\":%u,\"mode\":%u,\"rwMode\":%u},"
              "\"picMasterImr\":%u,\"ioapicId\":%u,\"lapicLvt0\":%u,\"mpState\":%u}",
              st->vcpu.regs.rip, st->vcpu.regs.rflags, cs, cr3, efer, apic_base, captured_msr(st, v->vm.msr_count, 0x10),
              st->vcpu.tsc_offset, st->vm.clock.clock, pit0->count, pit0->mode, pit0->read_state, st->vm.pic_master.chip.pic.imr,
              st->vm.ioapic.chip.ioapic.id, lvt0, st->vcpu.mp_state.mp_state);
}

static void fork_reply(const struct fork_report *rep, int ok, const char *err) {
    tb_printf(&out, "{\"ok\":%s,", ok ? "true" : "false");
    if (!ok) {
        tb_printf(&out, "\"error\":");
        tb_json_string(&out, err);
        tb_printf(&out, ",");
    }
    if (rep->count == 1) {
        tb_printf(&out, "\"pid\":%d,\"socket\":", rep->child[0].pid);
        tb_json_string(&out, rep->child[0].socket_path);
        tb_printf(&out, ",\"agentSocket\":");
        tb_json_string(&out, rep->child[0].agent_path);
        tb_printf(&out, ",");
    }
    tb_printf(&out, "\"children\":[");
    for (int i = 0; i < rep->count; i++) {
        tb_printf(&out, "%s{\"pid\":%d,\"socket\":", i ? "," : "", rep->child[i].pid);
        tb_json_string(&out, rep->child[i].socket_path);
        tb_printf(&out, ",\"agentSocket\":");
        tb_json_string(&out, rep->child[i].agent_path);
        tb_printf(&out, "}");
    }
    tb_printf(&out, "],\"parkUs\":%.1f,\"captureUs\":%.1f,\"forkUs\":%.1f,\"pauseUs\":%.1f,\"spawnUs\":%.1f}", rep->park_ns / 1e3,
              rep->capture_ns / 1e3, rep->fork_ns / 1e3, rep->pause_ns / 1e3, rep->spawn_ns / 1e3);
}

static int plain_absolute_path(const char *p) {
    return p[0] == '/' && !strchr(p, '"') && !strchr(p, '\\');
}

/* In a forked child, on its new thread: forget the parent's clients and listening socket, serve the child's own. */
static void serve_forked_child(struct vmm *v, int ctl_fd, const char *ctl_path) {
    struct control *c = &v->ctl;
    for (int i = 0; i < CONTROL_MAX_CLIENTS; i++)
        if (c->client[i]) drop_client(c, i);
    close(c->listen_fd); /* without unlinking: the path is the parent's */
    c->listen_fd = ctl_fd;
    set_path(c, ctl_path);
    exit(control_serve(v));
}

/*
 * fork [SOCKET_PATH [AGENT_SOCKET_PATH [SERIAL_LOG_PATH]]]
 * forks COUNT [RUN_DIR...]   (COUNT run directories, one per child, or none)
 */
static enum line_outcome cmd_fork(struct vmm *v, struct control_client *cl, int argc, char **argv, int batch) {
    static struct fork_paths chosen[VMM_MAX_FORK_BATCH];
    uint64_t count = 1;
    memset(chosen, 0, sizeof chosen);
    if (batch && (argc < 2 || parse_u64(argv[1], &count) < 0 || count < 1 || count > VMM_MAX_FORK_BATCH ||
                  (argc != 2 && (uint64_t)argc != 2 + count))) {
        control_reply_error(&out, "usage: forks COUNT [RUN_DIR...] (COUNT 1..256, one run directory per child or none)");
        return LINE_OK;
    }
    if (!batch && (argc > 4 || (argc > 2 && !v->board))) {
        control_reply_error(&out, "usage: fork [SOCKET_PATH [AGENT_SOCKET_PATH [SERIAL_LOG_PATH]]]");
        return LINE_OK;
    }
    if (v->board && v->board->net.present && (!batch || argc == 2)) {
        control_reply_error(&out, "this VM has a network: fork it with `forks COUNT RUN_DIR...` (each child connects to the network "
                                  "socket RUN_DIR/" BOARD_NET_SOCKET_NAME ", started before the request)");
        return LINE_OK;
    }
    for (int i = batch ? 2 : 1; i < argc; i++)
        if (!plain_absolute_path(argv[i])) return control_reply_error(&out, "paths must be absolute and plain"), LINE_OK;
    for (int i = 2; batch && i < argc; i++) chosen[i - 2].run_dir = argv[i];
    if (!batch && argc > 1) chosen[0].socket = argv[1];
    if (!batch && argc > 2) chosen[0].agent_socket = argv[2];
    if (!batch && argc > 3) chosen[0].serial_log = argv[3];
    struct fork_report *rep = malloc(sizeof *rep);
    if (!rep) return control_reply_error(&out, "out of memory: nothing forked"), LINE_OK;
    const struct fork_request req = {.count = (int)count, .paths = chosen, .default_dir = v->ctl.socket_dir, .child_main = serve_forked_child};
    char err[300] = "";
    int r = vmm_fork(v, &req, rep, err, sizeof err);
    if (r == 1) { /* the spawner is at work: answered when it has reported every child */
        cl->pending = rep;
        cl->pending_deadline = now_ns() + (int64_t)SPAWN_TIMEOUT_MS * 1000000;
        return LINE_DEFERRED;
    }
    fork_reply(rep, r == 0, err);
    free(rep);
    return LINE_OK;
}

/* snapshot DIR: DIR must exist and be empty of snapshot files; the writer child fills it (docs/vmm.md). */
static void cmd_snapshot(struct vmm *v, int argc, char **argv) {
    if (argc != 2 || !plain_absolute_path(argv[1])) return control_reply_error(&out, "usage: snapshot DIR (an absolute, plain path)");
    struct snapshot_report rep;
    char err[200] = "";
    if (vmm_snapshot(v, argv[1], &rep, err, sizeof err) < 0) return control_reply_error(&out, err);
    tb_printf(&out, "{\"ok\":true,\"writer\":%d,\"parkUs\":%.1f,\"captureUs\":%.1f,\"forkUs\":%.1f,\"pauseUs\":%.1f}", rep.writer_pid,
              rep.park_ns / 1e3, rep.capture_ns / 1e3, rep.fork_ns / 1e3, rep.pause_ns / 1e3);
}

static bool extra_command(struct vmm *v, int argc, char **argv) {
    for (const struct control_command *cmd = control_test_commands; cmd->verb; cmd++) {
        if (strcmp(argv[0], cmd->verb)) continue;
        cmd->run(v, argc, argv, &out);
        return true;
    }
    return false;
}

static enum line_outcome dispatch(struct vmm *v, struct control_client *cl, int argc, char **argv) {
    const char *verb = argv[0];
    if (!strcmp(verb, "ping")) control_reply_ok(&out);
    else if (!strcmp(verb, "status")) cmd_status(v);
    else if (!strcmp(verb, "pause")) cmd_pause(v);
    else if (!strcmp(verb, "resume")) cmd_resume(v);
    else if (!strcmp(verb, "state")) cmd_state(v);
    else if (!strcmp(verb, "fork") || !strcmp(verb, "forks")) return cmd_fork(v, cl, argc, argv, verb[4] == 's');
    else if (!strcmp(verb, "snapshot")) cmd_snapshot(v, argc, argv);
    else if (!strcmp(verb, "quit")) {
        control_reply_ok(&out);
        return LINE_QUIT;
    } else if (!extra_command(v, argc, argv)) control_reply_error(&out, "unknown request");
    return LINE_OK;
}

/* ---- connection handling -------------------------------------------------- */

/*
 * Client sockets are non-blocking: a client that sends requests but does not
 * read its replies is given SEND_GRACE_MS in all to make room, then dropped.
 * The control thread also moves the agent socket's data, so it must never
 * wait on one client for long.
 */
#define SEND_GRACE_MS 2000

static int send_all(int fd, const char *buf, size_t len) {
    int64_t deadline = now_ns() + (int64_t)SEND_GRACE_MS * 1000000;
    while (len) {
        ssize_t n = send(fd, buf, len, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && errno == EAGAIN) {
            int64_t left_ms = (deadline - now_ns()) / 1000000;
            struct pollfd p = {.fd = fd, .events = POLLOUT};
            if (left_ms <= 0 || poll(&p, 1, (int)left_ms) <= 0) return -1;
            continue;
        }
        if (n <= 0) return -1;
        buf += n;
        len -= (size_t)n;
    }
    return 0;
}

/* The reply in `out`, as one line. */
static int send_reply(int fd) {
    if (out.overflow) control_reply_error(&out, "reply too large for the control channel");
    out.data[out.len++] = '\n'; /* the buffer always leaves this byte free */
    return send_all(fd, out.data, out.len);
}

static enum line_outcome handle_line(struct vmm *v, struct control_client *cl, char *line) {
    static char *argv[MAX_ARGS]; /* the control thread is the only caller */
    enum line_outcome outcome = LINE_OK;
    int argc = split_args(line, argv);
    if (argc == 0) return LINE_OK;
    tb_reset(&out);
    if (argc < 0) control_reply_error(&out, "too many arguments");
    else outcome = dispatch(v, cl, argc, argv);
    if (outcome == LINE_DEFERRED) return outcome;
    if (send_reply(cl->fd) < 0) return LINE_CLOSE;
    return outcome;
}

/* Runs every complete line in the client's buffer, up to one whose answer has to wait. */
static enum line_outcome drain_lines(struct vmm *v, struct control_client *cl) {
    while (!cl->pending) {
        char *nl = memchr(cl->buf, '\n', cl->used);
        if (!nl) return cl->used == sizeof cl->buf ? LINE_CLOSE : LINE_OK;
        *nl = '\0';
        size_t consumed = (size_t)(nl - cl->buf) + 1;
        enum line_outcome o = handle_line(v, cl, cl->buf);
        memmove(cl->buf, cl->buf + consumed, cl->used - consumed);
        cl->used -= consumed;
        if (o != LINE_OK && o != LINE_DEFERRED) return o;
    }
    return LINE_OK;
}

static enum line_outcome on_client_readable(struct vmm *v, int i) {
    struct control_client *cl = v->ctl.client[i];
    ssize_t n = recv(cl->fd, cl->buf + cl->used, sizeof cl->buf - cl->used, 0);
    if (n < 0 && (errno == EINTR || errno == EAGAIN)) return LINE_OK;
    if (n <= 0) return LINE_CLOSE;
    cl->used += (size_t)n;
    enum line_outcome o = drain_lines(v, cl);
    if (o == LINE_CLOSE && cl->used == sizeof cl->buf) {
        static const char too_long[] = "{\"ok\":false,\"error\":\"line too long\"}\n";
        send_all(cl->fd, too_long, sizeof too_long - 1);
    }
    return o;
}

/* The spawner of this client's fork reported (or it is overdue): answer once every child is accounted for. */
static enum line_outcome on_spawner_report(struct vmm *v, int i, bool overdue) {
    struct control_client *cl = v->ctl.client[i];
    struct fork_report *rep = cl->pending;
    int r;
    if (overdue) {
        snprintf(rep->error, sizeof rep->error, "the spawner did not make %d children within %d s", rep->wanted, SPAWN_TIMEOUT_MS / 1000);
        vmm_fork_abandon(v, rep);
        r = rep->count == rep->wanted ? 0 : -1;
    } else if ((r = vmm_fork_collect(v, rep)) == 1) {
        return LINE_OK;
    }
    tb_reset(&out);
    fork_reply(rep, r == 0, rep->error);
    free(rep);
    cl->pending = NULL;
    if (send_reply(cl->fd) < 0) return LINE_CLOSE;
    return drain_lines(v, cl); /* what the client sent meanwhile */
}

static void accept_client(struct control *c) {
    int fd = accept4(c->listen_fd, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK);
    if (fd < 0) return;
    for (int i = 0; i < CONTROL_MAX_CLIENTS; i++) {
        if (c->client[i]) continue;
        c->client[i] = malloc(sizeof *c->client[i]);
        if (!c->client[i]) break;
        c->client[i]->fd = fd;
        c->client[i]->used = 0;
        c->client[i]->pending = NULL;
        return;
    }
    close(fd); /* full: the peer sees EOF */
}

enum owner_kind { OWNER_SIGNAL, OWNER_STOP, OWNER_BOARD, OWNER_LISTEN, OWNER_CLIENT, OWNER_SPAWNER };

struct owner {
    enum owner_kind kind;
    int client; /* OWNER_CLIENT, OWNER_SPAWNER */
};

#define MAX_POLLFDS (CONTROL_MAX_CLIENTS + 3 + BOARD_MAX_POLLFDS)

/* A client with a fork pending is not read (its next lines wait); its spawner's pipe is polled instead. */
static int build_pollset(struct vmm *v, struct pollfd *pfd, struct owner *owner) {
    struct control *c = &v->ctl;
    int n = 0;
    pfd[n] = (struct pollfd){.fd = signal_fd, .events = POLLIN};
    owner[n++] = (struct owner){OWNER_SIGNAL, -1};
    if (v->exit_on_stop) {
        pfd[n] = (struct pollfd){.fd = v->cpu.stop_fd, .events = POLLIN};
        owner[n++] = (struct owner){OWNER_STOP, -1};
    }
    if (v->board) {
        int added = board_poll_fill(v->board, pfd + n);
        for (int i = 0; i < added; i++) owner[n++] = (struct owner){OWNER_BOARD, -1};
    }
    pfd[n] = (struct pollfd){.fd = c->listen_fd, .events = POLLIN};
    owner[n++] = (struct owner){OWNER_LISTEN, -1};
    for (int i = 0; i < CONTROL_MAX_CLIENTS; i++) {
        const struct control_client *cl = c->client[i];
        if (!cl) continue;
        pfd[n] = (struct pollfd){.fd = cl->pending ? cl->pending->spawner_fd : cl->fd, .events = POLLIN};
        owner[n++] = (struct owner){cl->pending ? OWNER_SPAWNER : OWNER_CLIENT, i};
    }
    return n;
}

/* Until the earliest deadline of a pending fork, or for ever. */
static int poll_timeout_ms(const struct control *c) {
    int64_t first = INT64_MAX;
    for (int i = 0; i < CONTROL_MAX_CLIENTS; i++)
        if (c->client[i] && c->client[i]->pending && c->client[i]->pending_deadline < first) first = c->client[i]->pending_deadline;
    if (first == INT64_MAX) return -1;
    int64_t left = (first - now_ns()) / 1000000 + 1;
    return left < 0 ? 0 : left > INT32_MAX ? INT32_MAX : (int)left;
}

static void shut_down(struct vmm *v) {
    unlink(v->ctl.socket_path);
    if (v->board && v->board->agent_listen_fd >= 0) unlink(v->board->agent_path);
    /* Exiting closes the VM fd; that teardown is the kernel's business now, nobody waits on this process. */
}

/* A Linux guest that stopped (reset, power-off by panic=-1, KVM error) ends its VMM, as QEMU -no-reboot does. */
static int report_stop(struct vmm *v) {
    fprintf(stderr, "clade-vmm: guest stopped: %s (%s)\n", v->cpu.stop_reason, v->cpu.stop_detail);
    shut_down(v);
    return strcmp(v->cpu.stop_reason, "shutdown") == 0 ? 0 : 3;
}

/* Forks whose spawner is overdue are given up (each is answered with what it made); LINE_QUIT if a client then asked to quit. */
static enum line_outcome expire_pending(struct vmm *v) {
    int64_t now = now_ns();
    for (int i = 0; i < CONTROL_MAX_CLIENTS; i++) {
        struct control_client *cl = v->ctl.client[i];
        if (!cl || !cl->pending || cl->pending_deadline > now) continue;
        enum line_outcome o = on_spawner_report(v, i, true);
        if (o == LINE_QUIT) return o;
        if (o == LINE_CLOSE) drop_client(&v->ctl, i);
    }
    return LINE_OK;
}

int control_serve(struct vmm *v) {
    struct control *c = &v->ctl;
    for (;;) {
        struct pollfd pfd[MAX_POLLFDS];
        struct owner owner[MAX_POLLFDS];
        if (v->exit_on_stop && atomic_load(&v->cpu.phase) == VCPU_STOPPED) return report_stop(v);
        int n = build_pollset(v, pfd, owner);
        int ready = poll(pfd, (nfds_t)n, poll_timeout_ms(c));
        if (ready < 0) {
            if (errno == EINTR) continue;
            return shut_down(v), 1;
        }
        if (expire_pending(v) == LINE_QUIT) return shut_down(v), 0;
        if (ready == 0) continue;
        int board_first = -1, board_count = 0;
        for (int k = 0; k < n; k++) {
            if (owner[k].kind == OWNER_BOARD && board_first < 0) board_first = k;
            if (owner[k].kind == OWNER_BOARD) board_count++;
            if (!pfd[k].revents || owner[k].kind == OWNER_BOARD || owner[k].kind == OWNER_STOP) continue;
            if (owner[k].kind == OWNER_SIGNAL) return shut_down(v), 0;
            if (owner[k].kind == OWNER_LISTEN) {
                accept_client(c);
                continue;
            }
            int i = owner[k].client;
            if (!c->client[i]) continue; /* dropped earlier in this round */
            if (owner[k].kind == OWNER_SPAWNER && !c->client[i]->pending) continue; /* answered earlier in this round */
            enum line_outcome o = owner[k].kind == OWNER_SPAWNER ? on_spawner_report(v, i, false) : on_client_readable(v, i);
            if (o == LINE_QUIT) return shut_down(v), 0;
            if (o == LINE_CLOSE) drop_client(c, i);
        }
        if (board_count) board_poll_handle(v->board, pfd + board_first, board_count);
    }
}
