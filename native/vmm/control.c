/*
 * The control channel: a unix stream socket per VMM process, one request
 * per line ("verb arg arg\n"), one JSON object per line back. The protocol
 * is in docs/vmm.md. Input is parsed defensively: lines are capped at
 * CONTROL_LINE_MAX, numbers must parse completely, guest ranges are checked.
 *
 * The control thread calls fork(2). In a child that thread becomes the vCPU
 * thread and a new control thread serves the child's own socket (fork.c).
 */
#include "vmm.h"

#include <errno.h>
#include <inttypes.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#define REPLY_MAX (128 * 1024)
#define MAX_ARGS (2 + VMM_MAX_FORK_BATCH) /* forks COUNT DIR... */
#define GUEST_IO_MAX 4096

enum line_outcome { LINE_OK, LINE_CLOSE, LINE_QUIT };

static int signal_fd = -1;

int control_listen(const char *path, int *fd_out) {
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    if (strlen(path) >= sizeof addr.sun_path) return errno = ENAMETOOLONG, -1;
    strcpy(addr.sun_path, path);
    /* Non-blocking: a client that gave up between poll and accept must not leave the control thread in accept. */
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0) return -1;
    if (bind(fd, (struct sockaddr *)&addr, sizeof addr) < 0 || listen(fd, 64) < 0) {
        int saved = errno;
        close(fd);
        return errno = saved, -1;
    }
    *fd_out = fd;
    return 0;
}

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

static void drop_client(struct control *c, int i) {
    close(c->client[i]->fd);
    free(c->client[i]);
    c->client[i] = NULL;
}

/* In a fresh child: forget the parent's listening socket and connections (without unlinking the parent's path). */
void control_drop_inherited(struct control *c, int keep_fd, const char *new_path) {
    for (int i = 0; i < CONTROL_MAX_CLIENTS; i++)
        if (c->client[i]) drop_client(c, i);
    close(c->listen_fd);
    c->listen_fd = keep_fd;
    c->next_child_seq = 0;
    set_path(c, new_path);
}

/* ---- parsing ------------------------------------------------------------ */

static int parse_u64(const char *s, uint64_t *out) {
    if (!s || !*s || *s == '-') return -1;
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 0);
    if (errno || *end) return -1;
    *out = v;
    return 0;
}

static int split_args(char *line, char **argv) {
    int argc = 0;
    for (char *tok = strtok(line, " \t\r"); tok; tok = strtok(NULL, " \t\r")) {
        if (argc == MAX_ARGS) return -1;
        argv[argc++] = tok;
    }
    return argc;
}

static int hex_digit(char ch) {
    if (ch >= '0' && ch <= '9') return ch - '0';
    if (ch >= 'a' && ch <= 'f') return ch - 'a' + 10;
    if (ch >= 'A' && ch <= 'F') return ch - 'A' + 10;
    return -1;
}

/* ---- replies ------------------------------------------------------------ */

/*
 * Every reply is built by appending to one bounded buffer. An append that
 * would not fit is not written and marks the reply as overflowed; the
 * request is then answered with an error instead (handle_line), so no reply
 * is ever cut off mid-JSON or written past the buffer. The largest real
 * reply, `forks 256` with every path at its longest, needs ~70 KiB.
 */
static struct {
    char data[REPLY_MAX];
    size_t len;
    bool overflow;
} out;

static void out_reset(void) {
    out.len = 0;
    out.overflow = false;
}

static void outf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void outf(const char *fmt, ...) {
    if (out.overflow) return;
    size_t room = sizeof out.data - 1 - out.len; /* one byte stays free for the newline */
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(out.data + out.len, room + 1, fmt, ap);
    va_end(ap);
    if (n < 0 || (size_t)n > room) {
        out.data[out.len] = '\0';
        out.overflow = true;
        return;
    }
    out.len += (size_t)n;
}

/* A JSON string: paths and messages may hold quotes, backslashes or control bytes. */
static void out_string(const char *s) {
    outf("\"");
    for (; *s && !out.overflow; s++) {
        unsigned char ch = (unsigned char)*s;
        if (ch == '"' || ch == '\\') outf("\\%c", ch);
        else if (ch < 0x20) outf("\\u%04x", ch);
        else outf("%c", ch);
    }
    outf("\"");
}

static void reply_error(const char *message) {
    out_reset();
    outf("{\"ok\":false,\"error\":");
    out_string(message);
    outf("}");
}

static void reply_ok(void) {
    out_reset();
    outf("{\"ok\":true}");
}

static const char *phase_name(int phase, int user_paused) {
    if (phase == VCPU_STOPPED) return "stopped";
    return user_paused ? "paused" : "running";
}

static uint64_t guest_u64(const struct vm *vm, uint64_t gpa) {
    uint64_t v = 0;
    const uint8_t *p = vm_guest_ptr(vm, gpa, 8);
    if (p) memcpy(&v, p, 8);
    return v;
}

static void cmd_status(struct vmm *v) {
    struct vcpu *cpu = &v->cpu;
    int phase = atomic_load(&cpu->phase);
    outf("{\"ok\":true,\"pid\":%d,\"ppid\":%d,\"depth\":%d,\"state\":\"%s\",\"reason\":", (int)getpid(), (int)getppid(), v->depth,
         phase_name(phase, v->user_paused));
    out_string(phase == VCPU_STOPPED ? cpu->stop_reason : "");
    outf(",\"detail\":");
    out_string(phase == VCPU_STOPPED ? cpu->stop_detail : "");
    outf(",\"counter\":%" PRIu64 ",\"ack\":%" PRIu64 ",\"exits\":%" PRIu64 ",\"heartbeats\":%" PRIu64 ",\"reports\":%" PRIu64
         ",\"lastReport\":%" PRIu64 ",\"forks\":%" PRIu64 ",\"msrs\":%u,\"msrsNotRestored\":%u,"
         "\"timing\":{\"forkNs\":%" PRId64 ",\"builtNs\":%" PRId64 ",\"restoredNs\":%" PRId64 ",\"firstRunNs\":%" PRId64
         ",\"firstExitNs\":%" PRId64 "},\"guest\":\"%s\",\"agentSocket\":",
         guest_u64(&v->vm, GUEST_DATA + GUEST_COUNTER), guest_u64(&v->vm, GUEST_DATA + GUEST_ACK), (uint64_t)atomic_load(&cpu->exits),
         (uint64_t)atomic_load(&cpu->heartbeats), (uint64_t)atomic_load(&cpu->reports), (uint64_t)atomic_load(&cpu->last_report),
         v->forks_done, v->vm.msr_count, v->state.msrs_not_restored, cpu->timing.fork_ns, cpu->timing.built_ns,
         cpu->timing.restored_ns, cpu->timing.first_run_ns, cpu->timing.first_exit_ns, v->board ? "linux" : "cpl3");
    out_string(v->board ? v->board->agent_path : "");
    outf(",\"agentConnected\":%s,\"serialLogBytes\":%" PRIu64 "}", v->board && v->board->agent_fd >= 0 ? "true" : "false",
         v->board ? v->board->serial.bytes : 0);
}

static void cmd_read(struct vmm *v, int argc, char **argv) {
    uint64_t gpa, len;
    if (argc != 3 || parse_u64(argv[1], &gpa) < 0 || parse_u64(argv[2], &len) < 0) return reply_error("usage: read GPA LEN");
    if (len > GUEST_IO_MAX) return reply_error("read is limited to 4096 bytes");
    const uint8_t *p = vm_guest_ptr(&v->vm, gpa, len);
    if (!p) return reply_error("guest range out of bounds");
    outf("{\"ok\":true,\"hex\":\"");
    for (uint64_t i = 0; i < len; i++) outf("%02x", p[i]);
    outf("\"}");
}

static void cmd_write(struct vmm *v, int argc, char **argv) {
    uint64_t gpa;
    if (argc != 3 || parse_u64(argv[1], &gpa) < 0) return reply_error("usage: write GPA HEX");
    size_t digits = strlen(argv[2]);
    if (digits % 2 || digits / 2 > GUEST_IO_MAX) return reply_error("hex must have an even length, at most 8192 digits");
    uint8_t bytes[GUEST_IO_MAX];
    for (size_t i = 0; i < digits / 2; i++) {
        int hi = hex_digit(argv[2][2 * i]), lo = hex_digit(argv[2][2 * i + 1]);
        if (hi < 0 || lo < 0) return reply_error("bad hex digit");
        bytes[i] = (uint8_t)(hi << 4 | lo);
    }
    uint8_t *p = vm_guest_ptr(&v->vm, gpa, digits / 2);
    if (!p) return reply_error("guest range out of bounds");
    memcpy(p, bytes, digits / 2);
    vcpu_kick(&v->cpu);
    reply_ok();
}

static void cmd_read64(struct vmm *v, int argc, char **argv) {
    uint64_t gpa;
    if (argc != 2 || parse_u64(argv[1], &gpa) < 0) return reply_error("usage: read64 GPA");
    if (!vm_guest_ptr(&v->vm, gpa, 8)) return reply_error("guest range out of bounds");
    outf("{\"ok\":true,\"value\":%" PRIu64 "}", guest_u64(&v->vm, gpa));
}

static void cmd_write64(struct vmm *v, int argc, char **argv) {
    uint64_t gpa, value;
    if (argc != 3 || parse_u64(argv[1], &gpa) < 0 || parse_u64(argv[2], &value) < 0) return reply_error("usage: write64 GPA VALUE");
    uint8_t *p = vm_guest_ptr(&v->vm, gpa, 8);
    if (!p) return reply_error("guest range out of bounds");
    /* An aligned 8-byte store: the running guest never sees a torn value. */
    if (gpa % 8 == 0) atomic_store((_Atomic uint64_t *)(void *)p, value);
    else memcpy(p, &value, 8);
    vcpu_kick(&v->cpu);
    reply_ok();
}

/* Mailbox convenience for the test guest: argument first, then the command word the guest polls. */
static void cmd_guest(struct vmm *v, int argc, char **argv) {
    uint64_t command, arg = 0;
    if (argc < 2 || argc > 3 || parse_u64(argv[1], &command) < 0 || (argc == 3 && parse_u64(argv[2], &arg) < 0))
        return reply_error("usage: guest CMD [ARG]");
    _Atomic uint64_t *mailbox = (_Atomic uint64_t *)(void *)(v->vm.ram + GUEST_DATA);
    uint64_t ack = atomic_load(&mailbox[GUEST_ACK / 8]);
    atomic_store(&mailbox[GUEST_ARG / 8], arg);
    atomic_store(&mailbox[GUEST_CMD / 8], command);
    vcpu_kick(&v->cpu);
    outf("{\"ok\":true,\"ack\":%" PRIu64 "}", ack);
}

/* Why vcpu_park failed, for the reply. */
static void park_error(void) {
    reply_error(errno == ETIMEDOUT ? "vcpu did not stop in time" : "vcpu is stopped");
}

static void cmd_pause(struct vmm *v) {
    if (v->user_paused) return reply_ok();
    if (vcpu_park(&v->cpu) < 0) return park_error();
    v->user_paused = 1;
    reply_ok();
}

static void cmd_resume(struct vmm *v) {
    if (v->user_paused) vcpu_resume(&v->cpu);
    v->user_paused = 0;
    reply_ok();
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
    if (r < 0) return reply_error(failed);
    const struct machine_state *st = &v->state;
    const struct kvm_sregs2 *s2 = &st->vcpu.sregs2;
    const struct kvm_sregs *s1 = &st->vcpu.sregs;
    uint64_t cr3 = v->vm.has_sregs2 ? s2->cr3 : s1->cr3, efer = v->vm.has_sregs2 ? s2->efer : s1->efer;
    uint64_t apic_base = v->vm.has_sregs2 ? s2->apic_base : s1->apic_base;
    unsigned cs = v->vm.has_sregs2 ? s2->cs.selector : s1->cs.selector;
    const struct kvm_pit_channel_state *pit0 = &st->vm.pit.channels[0];
    uint32_t lvt0;
    memcpy(&lvt0, st->vcpu.lapic.regs + 0x350, sizeof lvt0);
    outf("{\"ok\":true,\"rip\":%llu,\"rflags\":%llu,\"cs\":%u,\"cr3\":%" PRIu64 ",\"efer\":%" PRIu64 ",\"apicBase\":%" PRIu64
         ",\"tsc\":%" PRIu64 ",\"tscOffset\":%" PRIu64 ",\"clockNs\":%llu,\"pit0\":{\"count\":%u,\"mode\":%u,\"rwMode\":%u},"
         "\"picMasterImr\":%u,\"ioapicId\":%u,\"lapicLvt0\":%u,\"mpState\":%u}",
         st->vcpu.regs.rip, st->vcpu.regs.rflags, cs, cr3, efer, apic_base, captured_msr(st, v->vm.msr_count, 0x10),
         st->vcpu.tsc_offset, st->vm.clock.clock, pit0->count, pit0->mode, pit0->read_state, st->vm.pic_master.chip.pic.imr,
         st->vm.ioapic.chip.ioapic.id, lvt0, st->vcpu.mp_state.mp_state);
}

static void fork_reply(const struct fork_report *rep, int ok, const char *err) {
    outf("{\"ok\":%s,", ok ? "true" : "false");
    if (!ok) {
        outf("\"error\":");
        out_string(err);
        outf(",");
    }
    if (rep->count == 1) {
        outf("\"pid\":%d,\"socket\":", rep->child[0].pid);
        out_string(rep->child[0].socket_path);
        outf(",\"agentSocket\":");
        out_string(rep->child[0].agent_path);
        outf(",");
    }
    outf("\"children\":[");
    for (int i = 0; i < rep->count; i++) {
        outf("%s{\"pid\":%d,\"socket\":", i ? "," : "", rep->child[i].pid);
        out_string(rep->child[i].socket_path);
        outf(",\"agentSocket\":");
        out_string(rep->child[i].agent_path);
        outf("}");
    }
    outf("],\"parkUs\":%.1f,\"captureUs\":%.1f,\"forkUs\":%.1f,\"pauseUs\":%.1f}", rep->park_ns / 1e3, rep->capture_ns / 1e3,
         rep->fork_ns / 1e3, rep->pause_ns / 1e3);
}

static int plain_absolute_path(const char *p) {
    return p[0] == '/' && !strchr(p, '"') && !strchr(p, '\\');
}

/*
 * fork [SOCKET_PATH [AGENT_SOCKET_PATH [SERIAL_LOG_PATH]]]
 * forks COUNT [RUN_DIR...]   (COUNT run directories, one per child, or none)
 */
static void cmd_fork(struct vmm *v, int argc, char **argv, int batch) {
    static struct fork_report rep;
    static struct fork_paths chosen[VMM_MAX_FORK_BATCH];
    uint64_t count = 1;
    memset(chosen, 0, sizeof chosen);
    if (batch && (argc < 2 || parse_u64(argv[1], &count) < 0 || count < 1 || count > VMM_MAX_FORK_BATCH ||
                  (argc != 2 && (uint64_t)argc != 2 + count)))
        return reply_error("usage: forks COUNT [RUN_DIR...] (COUNT 1..256, one run directory per child or none)");
    if (!batch && (argc > 4 || (argc > 2 && !v->board))) return reply_error("usage: fork [SOCKET_PATH [AGENT_SOCKET_PATH [SERIAL_LOG_PATH]]]");
    for (int i = batch ? 2 : 1; i < argc; i++)
        if (!plain_absolute_path(argv[i])) return reply_error("paths must be absolute and plain");
    for (int i = 2; batch && i < argc; i++) chosen[i - 2].run_dir = argv[i];
    if (!batch && argc > 1) chosen[0].socket = argv[1];
    if (!batch && argc > 2) chosen[0].agent_socket = argv[2];
    if (!batch && argc > 3) chosen[0].serial_log = argv[3];
    char err[300] = "";
    int r = vmm_fork(v, (int)count, chosen, &rep, err, sizeof err);
    fork_reply(&rep, r == 0, err);
}

/* snapshot DIR: DIR must exist and be empty of snapshot files; the writer child fills it (docs/vmm.md). */
static void cmd_snapshot(struct vmm *v, int argc, char **argv) {
    if (argc != 2 || !plain_absolute_path(argv[1])) return reply_error("usage: snapshot DIR (an absolute, plain path)");
    struct snapshot_report rep;
    char err[200] = "";
    if (vmm_snapshot(v, argv[1], &rep, err, sizeof err) < 0) return reply_error(err);
    outf("{\"ok\":true,\"writer\":%d,\"parkUs\":%.1f,\"captureUs\":%.1f,\"forkUs\":%.1f,\"pauseUs\":%.1f}", rep.writer_pid,
         rep.park_ns / 1e3, rep.capture_ns / 1e3, rep.fork_ns / 1e3, rep.pause_ns / 1e3);
}

static void dispatch(struct vmm *v, int argc, char **argv, enum line_outcome *outcome) {
    const char *verb = argv[0];
    if (!strcmp(verb, "ping")) reply_ok();
    else if (!strcmp(verb, "status")) cmd_status(v);
    else if (!strcmp(verb, "read")) cmd_read(v, argc, argv);
    else if (!strcmp(verb, "write")) cmd_write(v, argc, argv);
    else if (!strcmp(verb, "read64")) cmd_read64(v, argc, argv);
    else if (!strcmp(verb, "write64")) cmd_write64(v, argc, argv);
    else if (!strcmp(verb, "guest")) cmd_guest(v, argc, argv);
    else if (!strcmp(verb, "pause")) cmd_pause(v);
    else if (!strcmp(verb, "resume")) cmd_resume(v);
    else if (!strcmp(verb, "state")) cmd_state(v);
    else if (!strcmp(verb, "fork") || !strcmp(verb, "forks")) cmd_fork(v, argc, argv, verb[4] == 's');
    else if (!strcmp(verb, "snapshot")) cmd_snapshot(v, argc, argv);
    else if (!strcmp(verb, "quit")) {
        *outcome = LINE_QUIT;
        reply_ok();
    } else reply_error("unknown request");
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

static enum line_outcome handle_line(struct vmm *v, int fd, char *line) {
    static char *argv[MAX_ARGS]; /* the control thread is the only caller */
    enum line_outcome outcome = LINE_OK;
    int argc = split_args(line, argv);
    if (argc == 0) return LINE_OK;
    out_reset();
    if (argc < 0) reply_error("too many arguments");
    else dispatch(v, argc, argv, &outcome);
    if (out.overflow) reply_error("reply too large for the control channel");
    out.data[out.len++] = '\n'; /* outf always leaves this byte free */
    if (send_all(fd, out.data, out.len) < 0) return LINE_CLOSE;
    return outcome;
}

/* Runs every complete line in the client's buffer. */
static enum line_outcome drain_lines(struct vmm *v, struct control_client *cl) {
    for (;;) {
        char *nl = memchr(cl->buf, '\n', cl->used);
        if (!nl) return cl->used == sizeof cl->buf ? LINE_CLOSE : LINE_OK;
        *nl = '\0';
        size_t consumed = (size_t)(nl - cl->buf) + 1;
        enum line_outcome o = handle_line(v, cl->fd, cl->buf);
        memmove(cl->buf, cl->buf + consumed, cl->used - consumed);
        cl->used -= consumed;
        if (o != LINE_OK) return o;
    }
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

static void accept_client(struct control *c) {
    int fd = accept4(c->listen_fd, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK);
    if (fd < 0) return;
    for (int i = 0; i < CONTROL_MAX_CLIENTS; i++) {
        if (c->client[i]) continue;
        c->client[i] = malloc(sizeof *c->client[i]);
        if (!c->client[i]) break;
        c->client[i]->fd = fd;
        c->client[i]->used = 0;
        return;
    }
    close(fd); /* full: the peer sees EOF */
}

#define OWNER_SIGNAL -2
#define OWNER_LISTEN -1
#define OWNER_STOP -3
#define OWNER_BOARD -4

static int build_pollset(struct vmm *v, struct pollfd *pfd, int *owner) {
    struct control *c = &v->ctl;
    int n = 0;
    pfd[n] = (struct pollfd){.fd = signal_fd, .events = POLLIN};
    owner[n++] = OWNER_SIGNAL;
    if (v->exit_on_stop) {
        pfd[n] = (struct pollfd){.fd = v->cpu.stop_fd, .events = POLLIN};
        owner[n++] = OWNER_STOP;
    }
    if (v->board) {
        int added = board_poll_fill(v->board, pfd + n);
        for (int i = 0; i < added; i++) owner[n++] = OWNER_BOARD;
    }
    pfd[n] = (struct pollfd){.fd = c->listen_fd, .events = POLLIN};
    owner[n++] = OWNER_LISTEN;
    for (int i = 0; i < CONTROL_MAX_CLIENTS; i++) {
        if (!c->client[i]) continue;
        pfd[n] = (struct pollfd){.fd = c->client[i]->fd, .events = POLLIN};
        owner[n++] = i;
    }
    return n;
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

int control_serve(struct vmm *v) {
    struct control *c = &v->ctl;
    for (;;) {
        struct pollfd pfd[CONTROL_MAX_CLIENTS + 3 + BOARD_MAX_POLLFDS];
        int owner[CONTROL_MAX_CLIENTS + 3 + BOARD_MAX_POLLFDS];
        if (v->exit_on_stop && atomic_load(&v->cpu.phase) == VCPU_STOPPED) return report_stop(v);
        int n = build_pollset(v, pfd, owner);
        if (poll(pfd, (nfds_t)n, -1) < 0) {
            if (errno == EINTR) continue;
            return shut_down(v), 1;
        }
        int board_first = -1, board_count = 0;
        for (int k = 0; k < n; k++) {
            if (owner[k] == OWNER_BOARD && board_first < 0) board_first = k;
            if (owner[k] == OWNER_BOARD) board_count++;
            if (!pfd[k].revents || owner[k] == OWNER_BOARD || owner[k] == OWNER_STOP) continue;
            if (owner[k] == OWNER_SIGNAL) return shut_down(v), 0;
            if (owner[k] == OWNER_LISTEN) {
                accept_client(c);
                continue;
            }
            enum line_outcome o = on_client_readable(v, owner[k]);
            if (o == LINE_QUIT) return shut_down(v), 0;
            if (o == LINE_CLOSE) drop_client(c, owner[k]);
        }
        if (board_count) board_poll_handle(v->board, pfd + board_first, board_count);
    }
}
