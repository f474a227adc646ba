/*
 * vmm-agent: a small static client for clade-vmm's sockets, used by the
 * Linux boot test inside the runner (which has busybox and no Python).
 *
 *   vmm-agent ctl SOCKET 'REQUEST LINE'          print the control reply; exit 0 if "ok":true
 *   vmm-agent hello AGENT_SOCKET TOKEN TIMEOUT_MS wait until the agent answers HELLO
 *   vmm-agent exec AGENT_SOCKET TOKEN 'SHELL CMD' run it, print its stdout, exit with its code
 *   vmm-agent fixup AGENT_SOCKET TOKEN NEW_TOKEN ID HOSTNAME   FORK_FIXUP
 *   vmm-agent fork-exec CTL_SOCKET CHILD_CTL CHILD_AGENT TOKEN 'SHELL CMD'
 *        fork, connect to the child's agent, run the command there; prints timings
 *   vmm-agent parks CTL_SOCKET N
 *        N park/resume cycles back to back on one connection ("state", "pause", "resume"), each
 *        answered within 10 s; exit 0 if all were ok
 *   vmm-agent netsink PATH SECONDS
 *        a stand-in for a sandbox's network process: sends the NIC that connects one frame, counts its frames
 *   vmm-agent churn AGENT_SOCKET CTL_SOCKET TOKEN MS [half]
 *        for MS milliseconds: connect to the agent socket and go away again (at once or after
 *        a whole HELLO; with "half" also after half a frame header), each time checking that
 *        the control socket still answers "status" within 3 s; exit 0 if it always did
 *   vmm-agent forkbench CTL_SOCKET N RUNS
 *        the parent's pause for `forks 1` against `forks N`, RUNS times each, alternating (on any guest;
 *        the CPL3 test guest is the quick one): every child must answer `status`, then it is told to
 *        quit. Prints one line per fork and the medians; exit 0 if every child answered
 *   vmm-agent tamper VMM SNAPSHOT_DIR WORK_DIR STRIDE
 *        plays someone who edits state.bin: starts VMM from SNAPSHOT_DIR's memory.raw and an edited
 *        copy of its state.bin (--restore-fds) once per edit: every STRIDE-th byte changed (as is,
 *        and with the checksum recomputed, as a forger would), cut short at several lengths,
 *        counts and sizes inflated. A start must be refused with exit status 4 (or 5: another
 *        host's KVM) or come up and serve; never crash. Prints a summary; exit 0 if all held
 *
 * The frame format and message types are those of docs/protocol.md. Every
 * wait has a deadline: nothing here blocks for ever.
 */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "../../agent/protocol.h" /* message types and field tags, generated from protocol.json */

#define MAGIC PROTO_MAGIC

static uint8_t frame[FRAME_MAX + 16];

static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

static int connect_unix(const char *path) {
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    if (strlen(path) >= sizeof a.sun_path) return -1;
    strcpy(a.sun_path, path);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd >= 0 && connect(fd, (struct sockaddr *)&a, sizeof a) == 0) return fd;
    if (fd >= 0) close(fd);
    return -1;
}

static int parse_hex(const char *hex, uint8_t *out, size_t len) {
    if (strlen(hex) != 2 * len) return -1;
    for (size_t i = 0; i < len; i++)
        if (sscanf(hex + 2 * i, "%2hhx", &out[i]) != 1) return -1;
    return 0;
}

static int send_all(int fd, const void *buf, size_t len) {
    const uint8_t *p = buf;
    while (len) {
        ssize_t n = send(fd, p, len, MSG_NOSIGNAL);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) return -1;
        p += n, len -= (size_t)n;
    }
    return 0;
}

/* Reads exactly len bytes before the deadline (ms, CLOCK_MONOTONIC); -1 on EOF, error or timeout. */
static int recv_exact(int fd, uint8_t *buf, size_t len, double deadline) {
    while (len) {
        int left = (int)(deadline - now_ms());
        struct pollfd p = {.fd = fd, .events = POLLIN};
        if (left <= 0 || poll(&p, 1, left) <= 0) return -1;
        ssize_t n = recv(fd, buf, len, 0);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) return -1;
        buf += n, len -= (size_t)n;
    }
    return 0;
}

static size_t put_field(uint8_t *p, uint16_t tag, const void *value, uint32_t len) {
    memcpy(p, &tag, 2);
    memcpy(p + 2, &len, 4);
    memcpy(p + 6, value, len);
    return 6 + len;
}

static int send_frame(int fd, uint8_t type, uint32_t id, const uint8_t *token, const uint8_t *body, uint32_t len) {
    uint32_t total = TOKEN_LEN + len;
    uint8_t hdr[16] = {'C', 'L', 'D', '1', type};
    memcpy(hdr + 8, &id, 4);
    memcpy(hdr + 12, &total, 4);
    if (send_all(fd, hdr, 16) < 0 || send_all(fd, token, TOKEN_LEN) < 0) return -1;
    return len ? send_all(fd, body, len) : 0;
}

/* Receives one frame: type, id and payload (in frame[], length *len). */
static int recv_frame(int fd, uint8_t *type, uint32_t *id, uint32_t *len, double deadline) {
    uint8_t hdr[16];
    if (recv_exact(fd, hdr, 16, deadline) < 0 || memcmp(hdr, MAGIC, 4)) return -1;
    *type = hdr[4];
    memcpy(id, hdr + 8, 4);
    memcpy(len, hdr + 12, 4);
    if (*len > FRAME_MAX) return -1;
    return recv_exact(fd, frame, *len, deadline);
}

static int64_t field_i64(const uint8_t *body, uint32_t len, uint16_t want, int64_t dflt) {
    for (uint32_t off = 0; off + 6 <= len;) {
        uint16_t tag;
        uint32_t n;
        memcpy(&tag, body + off, 2);
        memcpy(&n, body + off + 2, 4);
        if (n > len - off - 6) break;
        if (tag == want && n == 8) {
            int64_t v;
            memcpy(&v, body + off + 6, 8);
            return v;
        }
        off += 6 + n;
    }
    return dflt;
}

/* HELLO until OK: the agent may not have seen the host end open yet, so each try waits ~1 s. */
static int hello(const char *path, const uint8_t *token, double timeout_ms, int *fd_out) {
    double start = now_ms(), deadline = start + timeout_ms;
    for (uint32_t id = 1; now_ms() < deadline; id++) {
        int fd = connect_unix(path);
        if (fd < 0) {
            usleep(50000);
            continue;
        }
        for (int tries = 0; tries < 5 && now_ms() < deadline; tries++, id++) {
            if (send_frame(fd, T_HELLO, id, token, NULL, 0) < 0) break;
            uint8_t type;
            uint32_t rid, len;
            double until = now_ms() + 1000 < deadline ? now_ms() + 1000 : deadline;
            while (recv_frame(fd, &type, &rid, &len, until) == 0) {
                if (rid == id && type == T_OK) {
                    fprintf(stderr, "hello ok after %.1f ms (agent uptime %lld ms)\n", now_ms() - start, (long long)field_i64(frame, len, 32, -1));
                    *fd_out = fd;
                    return 0;
                }
            }
        }
        close(fd);
    }
    fprintf(stderr, "vmm-agent: no HELLO answer from %s within %.0f ms\n", path, timeout_ms);
    return -1;
}

/* Runs a shell command; stdout goes to ours; returns its exit code, -1 on protocol trouble. */
static int exec_shell(int fd, const uint8_t *token, const char *cmd, double timeout_ms) {
    static uint8_t body[8192];
    size_t n = strlen(cmd);
    if (n + 6 > sizeof body) return -1;
    uint32_t len = (uint32_t)put_field(body, F_SHELL, cmd, (uint32_t)n), id = 1000;
    if (send_frame(fd, T_EXEC, id, token, body, len) < 0) return -1;
    double deadline = now_ms() + timeout_ms;
    for (;;) {
        uint8_t type;
        uint32_t rid, flen;
        if (recv_frame(fd, &type, &rid, &flen, deadline) < 0) return fprintf(stderr, "vmm-agent: exec: no answer\n"), -1;
        if (rid != id) continue;
        if (type == T_STDOUT) fwrite(frame, 1, flen, stdout);
        if (type == T_STDERR) fwrite(frame, 1, flen, stderr);
        if (type == T_ERROR) return fprintf(stderr, "vmm-agent: exec refused\n"), -1;
        if (type == T_EXIT) return fflush(stdout), (int)field_i64(frame, flen, F_EXIT_CODE, -1);
    }
}

static int fixup(int fd, const uint8_t *token, const uint8_t *new_token, const char *id, const char *hostname) {
    static uint8_t body[1024];
    uint8_t seed[32];
    for (size_t i = 0; i < sizeof seed; i++) seed[i] = (uint8_t)(rand() ^ (int)i);
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    int64_t tns = (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
    size_t len = put_field(body, F_SEED, seed, sizeof seed);
    len += put_field(body + len, F_TIME_NS, &tns, 8);
    len += put_field(body + len, F_HOSTNAME, hostname, (uint32_t)strlen(hostname));
    len += put_field(body + len, F_SANDBOX_ID, id, (uint32_t)strlen(id));
    len += put_field(body + len, F_NEW_TOKEN, new_token, TOKEN_LEN);
    if (send_frame(fd, T_FORK_FIXUP, 2000, token, body, (uint32_t)len) < 0) return -1;
    double deadline = now_ms() + 10000;
    for (;;) {
        uint8_t type;
        uint32_t rid, flen;
        if (recv_frame(fd, &type, &rid, &flen, deadline) < 0) return -1;
        if (rid == 2000) return type == T_OK ? 0 : -1;
    }
}

static int ctl_deadline(const char *path, const char *line, char *reply, size_t cap, double timeout_ms) {
    reply[0] = '\0';
    int fd = connect_unix(path);
    if (fd < 0) return fprintf(stderr, "vmm-agent: cannot connect to %s\n", path), -1;
    char req[4096];
    int n = snprintf(req, sizeof req, "%s\n", line);
    size_t got = 0;
    double deadline = now_ms() + timeout_ms;
    if (n < 0 || (size_t)n >= sizeof req || send_all(fd, req, (size_t)n) < 0) return close(fd), -1;
    while (got < cap - 1 && !memchr(reply, '\n', got)) {
        if (recv_exact(fd, (uint8_t *)reply + got, 1, deadline) < 0) break;
        got++;
    }
    reply[got] = '\0';
    close(fd);
    return strstr(reply, "\"ok\":true") ? 0 : -1;
}

static int ctl(const char *path, const char *line, char *reply, size_t cap) { return ctl_deadline(path, line, reply, cap, 30000); }

/* One short-lived agent client: gone at once, after half a frame header, or after a HELLO and a short wait. */
static void churn_once(const char *agent, const uint8_t *token, unsigned kind, uint32_t id) {
    int fd = connect_unix(agent);
    if (fd < 0) return;
    if (kind == 1) {
        uint8_t half[7] = {'C', 'L', 'D', '1', T_HELLO};
        send_all(fd, half, sizeof half);
    } else if (kind == 2 && send_frame(fd, T_HELLO, id, token, NULL, 0) == 0) {
        uint8_t type;
        uint32_t rid, len;
        recv_frame(fd, &type, &rid, &len, now_ms() + 50 + rand() % 400);
    }
    close(fd);
}

/* Hammers the agent socket with connects and disconnects while the control socket must keep answering. */
static int churn(const char *agent, const char *ctl_path, const uint8_t *token, double ms, unsigned kinds) {
    char reply[65536];
    double end = now_ms() + ms;
    unsigned n = 0;
    srand((unsigned)getpid() ^ (unsigned)now_ms());
    for (; now_ms() < end; n++) {
        unsigned kind = (unsigned)rand() % kinds;
        churn_once(agent, token, kinds == 2 ? kind * 2 : kind, n + 1); /* 0 gone at once, 1 half a header, 2 a HELLO */
        double t = now_ms();
        if (ctl_deadline(ctl_path, "status", reply, sizeof reply, 3000) < 0) {
            printf("churn: status failed after %u connections (%.0f ms): [%s]\n", n, now_ms() - t, reply);
            return 1;
        }
        usleep((useconds_t)(rand() % 200) * 1000);
    }
    printf("churn: %u connections, status always answered\n", n);
    return 0;
}

/* Reads one reply line before the deadline; -1 on EOF or timeout. */
static int read_line(int fd, char *buf, size_t cap, double deadline) {
    size_t got = 0;
    while (got < cap - 1) {
        if (recv_exact(fd, (uint8_t *)buf + got, 1, deadline) < 0) return -1;
        if (buf[got++] == '\n') break;
    }
    buf[got] = '\0';
    return 0;
}

/* Parks right after resumes: a resumed vCPU thread may not have run yet when the next park is asked for. */
static int parks(const char *ctl_path, int n) {
    static const char *const cycle[] = {"state\n", "pause\n", "state\n", "resume\n"};
    char reply[4096];
    int fd = connect_unix(ctl_path);
    if (fd < 0) return fprintf(stderr, "vmm-agent: cannot connect to %s\n", ctl_path), 1;
    double t0 = now_ms();
    for (int i = 0; i < n; i++) {
        const char *req = cycle[i % 4];
        if (send_all(fd, req, strlen(req)) < 0 || read_line(fd, reply, sizeof reply, now_ms() + 10000) < 0) {
            printf("parks: no reply to request %d (%.*s) after %.0f ms\n", i, (int)strlen(req) - 1, req, now_ms() - t0);
            return close(fd), 1;
        }
        if (!strstr(reply, "\"ok\":true")) return printf("parks: request %d failed: %s", i, reply), close(fd), 1;
    }
    printf("parks: %d requests answered in %.0f ms\n", n, now_ms() - t0);
    return close(fd), 0;
}

static int token_arg(const char *hex, uint8_t *token) {
    if (parse_hex(hex, token, TOKEN_LEN) == 0) return 0;
    fprintf(stderr, "vmm-agent: a token is 64 hex digits\n");
    return -1;
}

static int cmd_fork_exec(char **argv) {
    uint8_t token[TOKEN_LEN];
    char line[1024], reply[8192];
    if (token_arg(argv[5], token) < 0) return 2;
    snprintf(line, sizeof line, "fork %s %s", argv[3], argv[4]);
    double t0 = now_ms();
    if (ctl(argv[2], line, reply, sizeof reply) < 0) return fprintf(stderr, "fork failed: %s", reply), 1;
    double forked = now_ms();
    int fd;
    if (hello(argv[4], token, 60000, &fd) < 0) return 1;
    double answered = now_ms();
    int code = exec_shell(fd, token, argv[6], 60000);
    printf("fork-exec reply_ms=%.1f hello_ms=%.1f first_result_ms=%.1f exit=%d fork_reply=%s", forked - t0, answered - t0,
           now_ms() - t0, code, reply);
    close(fd);
    return code == 0 ? 0 : 1;
}


/* ---- forkbench: the parent's pause against the number of children ------------------------- */

static double json_number(const char *reply, const char *key) {
    char pat[64];
    snprintf(pat, sizeof pat, "\"%s\":", key);
    const char *at = strstr(reply, pat);
    return at ? atof(at + strlen(pat)) : -1;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double median(double *v, int n) {
    qsort(v, (size_t)n, sizeof *v, cmp_double);
    return n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

static int pid_alive(int pid) {
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/stat", pid);
    FILE *f = fopen(path, "r");
    if (!f) return 0;
    char buf[512] = "";
    size_t got = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[got] = '\0';
    const char *paren = strrchr(buf, ')');
    return paren && paren[1] == ' ' && paren[2] != 'Z';
}

/* One `forks n`: the reply's pause, then every child asked for its status and told to quit. */
static int forkbench_once(const char *ctl_path, int n, double *pause_us, char *line, size_t cap) {
    static char reply[1 << 17];
    char req[64], sock[256], answer[4096];
    int pids[256], kids = 0, answered = 0;
    snprintf(req, sizeof req, "forks %d", n);
    double t0 = now_ms();
    if (ctl(ctl_path, req, reply, sizeof reply) < 0) return snprintf(line, cap, "forks %d failed: %.300s", n, reply), -1;
    double replied = now_ms();
    *pause_us = json_number(reply, "pauseUs");
    const char *at = strstr(reply, "\"children\":[");
    while (at && kids < 256 && (at = strstr(at, "{\"pid\":"))) {
        pids[kids] = atoi(at + 7);
        const char *s = strstr(at, "\"socket\":\"");
        if (!s) break;
        s += 10;
        const char *e = strchr(s, '"');
        if (!e || (size_t)(e - s) >= sizeof sock) break;
        memcpy(sock, s, (size_t)(e - s));
        sock[e - s] = '\0';
        if (ctl(sock, "status", answer, sizeof answer) == 0 && strstr(answer, "\"state\":\"running\"")) answered++;
        ctl(sock, "quit", answer, sizeof answer);
        kids++;
        at = e;
    }
    double all = now_ms();
    for (int i = 0; i < kids; i++)
        for (int w = 0; w < 500 && pid_alive(pids[i]); w++) usleep(10000);
    snprintf(line, cap, "forks=%d pause_us=%.1f spawn_us=%.1f reply_ms=%.1f all_answered_ms=%.1f children=%d answered=%d", n,
             *pause_us, json_number(reply, "spawnUs"), replied - t0, all - t0, kids, answered);
    return kids == n && answered == n ? 0 : -1;
}

static int forkbench(const char *ctl_path, int n, int runs) {
    double one[64], many[64];
    char line[512];
    int ok = 1;
    if (runs < 1 || runs > 64 || n < 2 || n > 256) return fprintf(stderr, "vmm-agent: forkbench N 2..256, RUNS 1..64\n"), 2;
    for (int r = 0; r < runs; r++) {
        if (forkbench_once(ctl_path, 1, &one[r], line, sizeof line) < 0) ok = 0;
        printf("forkbench run=%d %s\n", r, line);
        if (forkbench_once(ctl_path, n, &many[r], line, sizeof line) < 0) ok = 0;
        printf("forkbench run=%d %s\n", r, line);
        fflush(stdout);
    }
    double m1 = median(one, runs), mn = median(many, runs);
    printf("forkbench median pause_us forks1=%.1f forks%d=%.1f ratio=%.2f%s\n", m1, n, mn, mn / m1, ok ? "" : " (some children did not answer)");
    return ok ? 0 : 1;
}

/* ---- tamper: state.bin edits against the loader -------------------------------------- */

#define STATE_CHECKSUM_AT 96 /* state.bin header: magic 8, four u32, build id 64, RAM size 8, checksum */
#define STATE_HEADER 112

struct tamper_tally {
    unsigned starts, refused, foreign, started, crashed, other;
};

static uint64_t fnv1a64(const uint8_t *p, size_t n) {
    uint64_t h = 0xcbf29ce484222325ull;
    for (size_t i = 0; i < n; i++) h = (h ^ (i >= STATE_CHECKSUM_AT && i < STATE_CHECKSUM_AT + 8 ? 0 : p[i])) * 0x100000001b3ull;
    return h;
}

static void forge_checksum(uint8_t *p, size_t n) {
    if (n < STATE_HEADER) return;
    uint64_t h = fnv1a64(p, n);
    memcpy(p + STATE_CHECKSUM_AT, &h, 8);
}

static int write_file(const char *path, const uint8_t *p, size_t n) {
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0) return -1;
    size_t done = 0;
    while (done < n) {
        ssize_t w = write(fd, p + done, n - done);
        if (w <= 0) break;
        done += (size_t)w;
    }
    close(fd);
    return done == n ? 0 : -1;
}

/* One start from memory.raw and `state`: how it ended. The process is always gone afterwards. */
static void tamper_start(const char *vmm, const char *mem_path, const char *work, const uint8_t *state, size_t n,
                         const char *what, struct tamper_tally *t) {
    char state_path[512], sock[512];
    snprintf(state_path, sizeof state_path, "%s/state.bin", work);
    snprintf(sock, sizeof sock, "%s/t.sock", work);
    unlink(sock);
    if (write_file(state_path, state, n) < 0) return (void)t->other++;
    int out[2];
    if (pipe(out) < 0) return (void)t->other++;
    t->starts++;
    pid_t pid = fork();
    if (pid == 0) {
        int mem = open(mem_path, O_RDONLY), st = open(state_path, O_RDONLY), null = open("/dev/null", O_WRONLY);
        if (mem < 0 || st < 0 || dup2(mem, 3) < 0 || dup2(st, 4) < 0 || dup2(out[1], 1) < 0 || dup2(null, 2) < 0) _exit(127);
        execl(vmm, vmm, "run", "--socket", sock, "--restore-fds", "3,4", (char *)NULL);
        _exit(127);
    }
    close(out[1]);
    /* The ready line (stdout is a pipe: read, not recv), or EOF when the VMM exits without one. */
    char line[256] = "";
    size_t got = 0;
    double deadline = now_ms() + 20000;
    while (got < sizeof line - 1 && !memchr(line, '\n', got)) {
        struct pollfd p = {.fd = out[0], .events = POLLIN};
        int left = (int)(deadline - now_ms());
        if (left <= 0 || poll(&p, 1, left) <= 0) break;
        ssize_t n = read(out[0], line + got, sizeof line - 1 - got);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) break;
        got += (size_t)n;
        line[got] = '\0';
    }
    close(out[0]);
    int started = strstr(line, "\"ready\":true") != NULL;
    if (started) {
        char reply[256];
        ctl_deadline(sock, "quit", reply, sizeof reply, 5000);
    }
    int status = 0;
    for (int i = 0; i < 500 && waitpid(pid, &status, WNOHANG) == 0; i++) usleep(10000);
    if (waitpid(pid, &status, WNOHANG) == 0) { /* still there: a hang counts as a failure too */
        kill(pid, SIGKILL);
        waitpid(pid, &status, 0);
        t->other++;
        printf("tamper %s: no answer, killed\n", what);
        unlink(sock);
        return;
    }
    unlink(sock);
    if (started) t->started++;
    else if (WIFSIGNALED(status)) t->crashed++, printf("tamper %s: killed by signal %d\n", what, WTERMSIG(status));
    else if (WEXITSTATUS(status) == 4) t->refused++;
    else if (WEXITSTATUS(status) == 5) t->foreign++;
    else t->other++, printf("tamper %s: exit status %d\n", what, WEXITSTATUS(status));
}

static int tamper(const char *vmm, const char *snap, const char *work, size_t stride) {
    char path[512];
    snprintf(path, sizeof path, "%s/state.bin", snap);
    int fd = open(path, O_RDONLY);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) < 0 || st.st_size < STATE_HEADER || st.st_size > (1 << 24)) return fprintf(stderr, "tamper: cannot read %s\n", path), 2;
    size_t n = (size_t)st.st_size;
    uint8_t *orig = malloc(n), *buf = malloc(n);
    if (!orig || !buf || read(fd, orig, n) != (ssize_t)n) return fprintf(stderr, "tamper: cannot read %s\n", path), 2;
    close(fd);
    snprintf(path, sizeof path, "%s/memory.raw", snap);
    struct tamper_tally raw = {0}, forged = {0};
    char what[64];
    double t0 = now_ms();
    memcpy(buf, orig, n);
    tamper_start(vmm, path, work, buf, n, "unchanged", &forged);
    int unchanged_ok = forged.started == 1;
    forged = (struct tamper_tally){0};
    for (size_t at = stride / 2; at < n; at += stride) {
        memcpy(buf, orig, n);
        buf[at] ^= 0xa5;
        snprintf(what, sizeof what, "byte %zu", at);
        tamper_start(vmm, path, work, buf, n, what, &raw);
        if (at >= STATE_CHECKSUM_AT && at < STATE_CHECKSUM_AT + 8) continue;
        forge_checksum(buf, n);
        snprintf(what, sizeof what, "byte %zu, checksum forged", at);
        tamper_start(vmm, path, work, buf, n, what, &forged);
    }
    /* Cut short: as is, and with the total and checksum made to match. */
    const size_t cuts[] = {0, 7, STATE_HEADER - 1, STATE_HEADER, STATE_HEADER + 20, n / 3, n / 2, n - 8, n - 1};
    for (size_t i = 0; i < sizeof cuts / sizeof cuts[0]; i++) {
        memcpy(buf, orig, n);
        snprintf(what, sizeof what, "cut to %zu", cuts[i]);
        tamper_start(vmm, path, work, buf, cuts[i], what, &raw);
        if (cuts[i] < STATE_HEADER) continue;
        uint64_t total = cuts[i];
        memcpy(buf + 104, &total, 8);
        forge_checksum(buf, cuts[i]);
        snprintf(what, sizeof what, "cut to %zu, total and checksum forged", cuts[i]);
        tamper_start(vmm, path, work, buf, cuts[i], what, &forged);
    }
    /* Counts and sizes inflated: the section count, each section's length, the facts' MSR count and XSAVE size. */
    size_t off = STATE_HEADER;
    uint32_t sections;
    memcpy(&sections, orig + 20, 4);
    const uint64_t inflations[] = {8, 4096, 1ull << 32, ~0ull};
    for (uint32_t s = 0; s < sections && off + 16 <= n; s++) {
        uint32_t id;
        uint64_t bytes;
        memcpy(&id, orig + off, 4);
        memcpy(&bytes, orig + off + 8, 8);
        for (size_t k = 0; k < sizeof inflations / sizeof inflations[0]; k++) {
            memcpy(buf, orig, n);
            uint64_t big = bytes + inflations[k];
            memcpy(buf + off + 8, &big, 8);
            forge_checksum(buf, n);
            snprintf(what, sizeof what, "section %u length +%llu", id, (unsigned long long)inflations[k]);
            tamper_start(vmm, path, work, buf, n, what, &forged);
        }
        if (id == 1) { /* VM facts: msr_count, then xsave_size */
            const uint32_t counts[] = {257, 1u << 20, 0xffffffffu};
            for (int field = 0; field < 2; field++)
                for (size_t k = 0; k < 3; k++) {
                    memcpy(buf, orig, n);
                    memcpy(buf + off + 16 + 4 * field, &counts[k], 4);
                    forge_checksum(buf, n);
                    snprintf(what, sizeof what, "%s = %u", field ? "xsave_size" : "msr_count", counts[k]);
                    tamper_start(vmm, path, work, buf, n, what, &forged);
                }
        }
        off += 16 + ((bytes + 7) & ~7ull);
    }
    memcpy(buf, orig, n);
    uint32_t many = 0xffffffffu;
    memcpy(buf + 20, &many, 4);
    forge_checksum(buf, n);
    tamper_start(vmm, path, work, buf, n, "section count inflated", &forged);
    printf("tamper: %.0f ms; as edited: %u starts, %u refused (status 4), %u other, %u crashed; "
           "checksum forged: %u starts, %u refused (status 4), %u refused as another host's (5), %u came up, %u other, %u crashed\n",
           now_ms() - t0, raw.starts, raw.refused, raw.other, raw.crashed, forged.starts, forged.refused, forged.foreign, forged.started,
           forged.other, forged.crashed);
    int ok = unchanged_ok && raw.refused == raw.starts && forged.crashed == 0 && forged.other == 0;
    printf("tamper: %s\n", ok ? "all held" : unchanged_ok ? "FAILED" : "FAILED (the unchanged snapshot did not start)");
    free(orig);
    free(buf);
    return ok ? 0 : 1;
}

/*
 * netsink PATH SECONDS: a stand-in for a sandbox's network process. Listens on
 * PATH, takes one connection (a VM's NIC), sends it one broadcast frame (the
 * stream framing: a 4-byte big-endian length, then the frame), then reads
 * frames for SECONDS and prints "netsink: N frames, M bytes" (or why the
 * stream broke: a length above 65535 or a truncated frame).
 */
static int netsink(const char *path, double seconds) {
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    snprintf(addr.sun_path, sizeof addr.sun_path, "%s", path);
    int lfd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (lfd < 0 || bind(lfd, (struct sockaddr *)&addr, sizeof addr) < 0 || listen(lfd, 4) < 0) return perror("netsink: listen"), 1;
    double end = now_ms() + seconds * 1000;
    struct pollfd p = {.fd = lfd, .events = POLLIN};
    if (poll(&p, 1, (int)(seconds * 1000)) <= 0) return printf("netsink: nobody connected\n"), unlink(path), 1;
    int fd = accept(lfd, NULL, NULL);
    close(lfd);
    unlink(path);
    if (fd < 0) return perror("netsink: accept"), 1;
    uint8_t hello[4 + 60] = {0, 0, 0, 60, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x52, 0x54, 0x00, 0x12, 0x34, 0x56, 0x88, 0xb5};
    send_all(fd, hello, sizeof hello);
    static uint8_t buf[4 + 65536];
    size_t have = 0;
    unsigned long frames = 0, bytes = 0;
    const char *broke = NULL;
    while (!broke && now_ms() < end) {
        p = (struct pollfd){.fd = fd, .events = POLLIN};
        if (poll(&p, 1, (int)(end - now_ms()) + 1) <= 0) continue;
        ssize_t n = read(fd, buf + have, sizeof buf - have);
        if (n <= 0) {
            broke = have ? "a truncated frame, then EOF" : "EOF";
            break;
        }
        have += (size_t)n;
        while (have >= 4) {
            uint32_t len = (uint32_t)buf[0] << 24 | (uint32_t)buf[1] << 16 | (uint32_t)buf[2] << 8 | buf[3];
            if (len > 65535) {
                broke = "a length above 65535";
                break;
            }
            if (have < 4 + len) break;
            frames++, bytes += len;
            memmove(buf, buf + 4 + len, have - 4 - len);
            have -= 4 + len;
        }
    }
    printf("netsink: %lu frames, %lu bytes%s%s\n", frames, bytes, broke ? "; " : "", broke ? broke : "");
    close(fd);
    return 0;
}

int main(int argc, char **argv) {
    uint8_t token[TOKEN_LEN], new_token[TOKEN_LEN];
    char reply[65536];
    int fd;
    if (argc == 4 && !strcmp(argv[1], "ctl")) {
        int r = ctl(argv[2], argv[3], reply, sizeof reply);
        fputs(reply, stdout);
        return r == 0 ? 0 : 1;
    }
    if (argc == 5 && !strcmp(argv[1], "hello")) {
        if (token_arg(argv[3], token) < 0) return 2;
        return hello(argv[2], token, atof(argv[4]), &fd) == 0 ? 0 : 1;
    }
    if (argc == 5 && !strcmp(argv[1], "exec")) {
        if (token_arg(argv[3], token) < 0 || hello(argv[2], token, 30000, &fd) < 0) return 2;
        int code = exec_shell(fd, token, argv[4], 60000);
        return code < 0 ? 2 : code;
    }
    if (argc == 7 && !strcmp(argv[1], "fixup")) {
        if (token_arg(argv[3], token) < 0 || token_arg(argv[4], new_token) < 0 || hello(argv[2], token, 30000, &fd) < 0) return 2;
        return fixup(fd, token, new_token, argv[5], argv[6]) == 0 ? 0 : 1;
    }
    if (argc == 7 && !strcmp(argv[1], "fork-exec")) return cmd_fork_exec(argv);
    if (argc == 4 && !strcmp(argv[1], "parks")) return parks(argv[2], atoi(argv[3]));
    if (argc == 4 && !strcmp(argv[1], "netsink")) return netsink(argv[2], atof(argv[3]));
    if ((argc == 6 || (argc == 7 && !strcmp(argv[6], "half"))) && !strcmp(argv[1], "churn")) {
        if (token_arg(argv[4], token) < 0) return 2;
        return churn(argv[2], argv[3], token, atof(argv[5]), argc == 7 ? 3 : 2);
    }
    if (argc == 5 && !strcmp(argv[1], "forkbench")) return forkbench(argv[2], atoi(argv[3]), atoi(argv[4]));
    if (argc == 6 && !strcmp(argv[1], "tamper")) return tamper(argv[2], argv[3], argv[4], (size_t)atol(argv[5]) ? (size_t)atol(argv[5]) : 1);
    fprintf(stderr, "usage: see the comment at the top of native/vmm/test/vmm-agent.c\n");
    return 2;
}
