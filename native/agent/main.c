/* main.c: start-up, the event loop, request dispatch and the control messages. */
#include "agent.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define RECONNECT_POLL_MS 1000 /* fallback: the port raises SIGIO when the host end reopens */
#define SHUTDOWN_GRACE_MS 1000

struct agent g = {.port_fd = -1, .sig_fd = -1, .log_fd = 2};

void log_msg(const char *fmt, ...)
{
	char line[512] = "clade-agent: ";
	size_t n = strlen(line);
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(line + n, sizeof line - n - 1, fmt, ap);
	va_end(ap);
	n = strlen(line);
	line[n++] = '\n';
	ssize_t w = write(g.log_fd, line, n);
	(void)w; /* nowhere left to report a failing log */
}

int64_t now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void __attribute__((noreturn)) fatal(const char *what)
{
	log_msg("fatal: %s: %s", what, strerror(errno));
	if (g.pid1)
		boot_power_off();
	exit(1);
}

/* ---- control messages ---- */

static void do_hello(const struct req *r)
{
	struct timespec up;
	clock_gettime(CLOCK_BOOTTIME, &up);
	struct body b;
	body_start(&b);
	body_u64(&b, F_PROTO_VERSION, PROTO_VERSION);
	body_str(&b, F_AGENT_VERSION, AGENT_VERSION);
	body_u64(&b, F_UPTIME_MS, (uint64_t)up.tv_sec * 1000 + (uint64_t)up.tv_nsec / 1000000);
	body_str(&b, F_SANDBOX_ID, g.sandbox_id);
	/* A host that takes over this channel (a restarted daemon) continues its ids after this one. */
	body_u64(&b, F_LAST_ID, g.newest_before);
	send_body(T_OK, r->id, &b);
}

static bool fixup_valid(const struct req *r)
{
	static const uint8_t need[] = {F_SEED, F_TIME_NS, F_HOSTNAME, F_SANDBOX_ID, F_NEW_TOKEN};
	for (size_t i = 0; i < sizeof need; i++) {
		if (!r->has[need[i]]) {
			send_error(r->id, "bad_request", 0, "FORK_FIXUP lacks field %u", need[i]);
			return false;
		}
	}
	const char *why = NULL;
	if (r->len[F_SEED] < 32)
		why = "SEED must be at least 32 bytes";
	else if (r->len[F_NEW_TOKEN] != TOKEN_LEN)
		why = "NEW_TOKEN must be 32 bytes";
	else if (r->len[F_HOSTNAME] > HOST_NAME_MAX)
		why = "HOSTNAME is longer than 64 bytes";
	else if (r->len[F_SANDBOX_ID] > SANDBOX_ID_MAX)
		why = "SANDBOX_ID is longer than 255 bytes";
	if (why)
		send_error(r->id, "bad_request", 0, "%s", why);
	return why == NULL;
}

/* Makes a freshly forked VM distinct: entropy, clock, hostname, identity, token. */
static void do_fork_fixup(const struct req *r)
{
	if (!fixup_valid(r))
		return;
	if (g.pid1) {
		boot_credit_entropy(r->val[F_SEED], r->len[F_SEED]);
		uint64_t ns = r->num[F_TIME_NS];
		struct timespec ts = {.tv_sec = (time_t)(ns / 1000000000u), .tv_nsec = (long)(ns % 1000000000u)};
		if (clock_settime(CLOCK_REALTIME, &ts) < 0) {
			send_error(r->id, "io", errno, "clock_settime: %s", strerror(errno));
			return;
		}
		if (sethostname(REQ_STR(r, F_HOSTNAME), r->len[F_HOSTNAME]) < 0) {
			send_error(r->id, "io", errno, "sethostname: %s", strerror(errno));
			return;
		}
		net_reset_connections(); /* the child's network stack on the host never knew them */
	}
	memcpy(g.sandbox_id, r->val[F_SANDBOX_ID], r->len[F_SANDBOX_ID] + 1);
	memcpy(g.token, r->val[F_NEW_TOKEN], TOKEN_LEN);
	log_msg("fork fixup done; sandbox id now %s", g.sandbox_id);
	send_ok_empty(r->id);
}

/* True if SIGTERM or SIGINT came. SIGCHLD means reap; SIGIO only has to wake poll. */
static bool drain_signalfd(void)
{
	struct signalfd_siginfo si;
	bool term = false;
	while (read(g.sig_fd, &si, sizeof si) == (ssize_t)sizeof si)
		term |= si.ssi_signo == SIGTERM || si.ssi_signo == SIGINT;
	return term;
}

/* Reaps (sending EXITs) until no child is left or ms have passed; true if some remain. */
static bool wait_children(int64_t ms)
{
	int64_t end = now_ms() + ms;
	while (exec_reap()) {
		int64_t left = end - now_ms();
		if (left <= 0)
			return true;
		struct pollfd p = {.fd = g.sig_fd, .events = POLLIN};
		poll(&p, 1, (int)left);
		drain_signalfd();
	}
	return false;
}

/* SIGTERM, up to 1 s of grace, then SIGKILL. As init that means every process. */
static void stop_all_processes(void)
{
	files_abort_writes();
	exec_kill_all(SIGTERM);
	if (!wait_children(SHUTDOWN_GRACE_MS))
		return;
	/* Repeated, because in development mode each death can hand us more orphans. */
	int64_t end = now_ms() + SHUTDOWN_GRACE_MS;
	do
		exec_kill_all(SIGKILL);
	while (wait_children(50) && now_ms() < end);
}

static void __attribute__((noreturn)) leave(void)
{
	stop_all_processes();
	if (g.pid1) {
		sync();
		boot_power_off();
	}
	log_msg("exiting");
	exit(0);
}

static void do_shutdown(const struct req *r)
{
	log_msg("shutdown requested");
	send_ok_empty(r->id);
	leave();
}

/* ---- dispatch ---- */

struct handler {
	uint8_t type;
	bool raw; /* body is raw bytes, not fields */
	void (*fn)(const struct req *r);
};

static const struct handler handlers[] = {
	{T_HELLO, false, do_hello},
	{T_EXEC, false, exec_start},
	{T_STDIN, true, exec_stdin},
	{T_SIGNAL, false, exec_signal},
	{T_READ_FILE, false, file_read},
	{T_WRITE_OPEN, false, file_write_open},
	{T_WRITE_DATA, true, file_write_data},
	{T_WRITE_CLOSE, false, file_write_close},
	{T_LIST, false, file_list},
	{T_STAT, false, file_stat},
	{T_MKDIR, false, file_mkdir},
	{T_REMOVE, false, file_remove},
	{T_SHUTDOWN, false, do_shutdown},
	{T_FORK_FIXUP, false, do_fork_fixup},
};

static bool token_ok(const uint8_t *t)
{
	volatile uint8_t diff = 0; /* constant time: no early exit on the first mismatch */
	for (size_t i = 0; i < TOKEN_LEN; i++)
		diff |= t[i] ^ g.token[i];
	return diff == 0;
}

/*
 * Ids are compared in serial-number order, so the newest survives wrap-around;
 * STDIN and WRITE_DATA frames reuse an older id and do not move it back.
 */
static void note_request_id(uint32_t id)
{
	g.newest_before = g.newest_id;
	if (!g.seen_any || (int32_t)(id - g.newest_id) > 0)
		g.newest_id = id;
	g.seen_any = true;
}

static struct req req; /* large (argv/env tables), so not on the stack */

void dispatch_frame(uint8_t type, uint32_t id, uint8_t *payload, size_t len)
{
	if (len < TOKEN_LEN || !token_ok(payload)) {
		send_error(id, "auth", 0, "bad or missing token");
		return;
	}
	note_request_id(id);
	const struct handler *h = NULL;
	for (size_t i = 0; i < sizeof handlers / sizeof handlers[0]; i++)
		if (handlers[i].type == type)
			h = &handlers[i];
	if (!h) {
		send_error(id, "unsupported", 0, "unknown message type 0x%02x", type);
		return;
	}
	req.type = type;
	req.id = id;
	req.raw = payload + TOKEN_LEN;
	req.raw_len = len - TOKEN_LEN;
	char why[256];
	if (!h->raw && !req_parse(&req, payload + TOKEN_LEN, len - TOKEN_LEN, why, sizeof why)) {
		send_error(id, "bad_request", 0, "%s", why);
		return;
	}
	h->fn(&req);
}

/* ---- event loop ---- */

static void read_port(void)
{
	static uint8_t buf[PARSER_READ_MAX];
	ssize_t n = read(g.port_fd, buf, sizeof buf);
	if (n > 0)
		parser_feed(buf, (size_t)n);
	else if (n == 0 || (errno != EINTR && errno != EAGAIN))
		g.connected = false; /* EOF: the host end closed */
}

/*
 * A virtio port polls as POLLHUP for as long as the host end is closed, so it
 * is left out of poll then; with O_ASYNC the driver sends SIGIO when the host
 * end opens (and on every input, hence only while disconnected).
 */
static void port_async(bool on)
{
	int fl = fcntl(g.port_fd, F_GETFL);
	fcntl(g.port_fd, F_SETFL, on ? fl | O_ASYNC : fl & ~O_ASYNC);
}

/* True if the host end is open again; bytes held from before are parsed then (which may lose it again). */
static bool check_reconnect(void)
{
	struct pollfd p = {.fd = g.port_fd, .events = POLLIN};
	if (poll(&p, 1, 0) < 0 || (p.revents & (POLLHUP | POLLERR | POLLNVAL)))
		return false;
	g.connected = true;
	port_async(false);
	log_msg("host connected");
	parser_resume();
	return true;
}

static void host_lost(void)
{
	log_msg("host disconnected");
	parser_reset();
	files_abort_writes();
	if (!g.pid1)
		leave();
	port_async(true);
}

/* After a loss: the host end may have reopened before O_ASYNC was set, or be open already. */
static void reconnect(void)
{
	while (!g.connected && check_reconnect())
		if (!g.connected)
			host_lost();
}

static int64_t earliest(int64_t a, int64_t b) { return a < 0 ? b : (b < 0 || a < b) ? a : b; }

static int poll_timeout(int64_t now)
{
	int64_t d = earliest(parser_deadline(), exec_deadline());
	if (!g.connected)
		d = earliest(d, now + RECONNECT_POLL_MS);
	if (d < 0)
		return -1;
	return d <= now ? 0 : d - now > INT32_MAX ? INT32_MAX : (int)(d - now);
}

static void __attribute__((noreturn)) serve(void)
{
	static struct pollfd pfd[2 + 3 * MAX_EXECS];
	for (;;) {
		bool was_connected = g.connected; /* any write below may lose the host */
		pfd[0] = (struct pollfd){.fd = g.connected ? g.port_fd : -1, .events = POLLIN};
		pfd[1] = (struct pollfd){.fd = g.sig_fd, .events = POLLIN};
		size_t nexec = exec_pollfds(pfd + 2, sizeof pfd / sizeof pfd[0] - 2);
		if (poll(pfd, 2 + nexec, poll_timeout(now_ms())) < 0 && errno != EINTR)
			fatal("poll");
		exec_handle_poll(pfd + 2, nexec);
		if (pfd[0].revents)
			read_port();
		bool term = false;
		if (pfd[1].revents) {
			term = drain_signalfd();
			exec_reap();
		}
		int64_t now = now_ms();
		exec_check_timeouts(now);
		parser_check_timeout(now);
		if (term && !g.pid1)
			leave();
		if (was_connected && !g.connected)
			host_lost();
		reconnect();
	}
}

/* ---- start-up ---- */

static void setup_signals(void)
{
	sigset_t set;
	sigemptyset(&set);
	sigaddset(&set, SIGCHLD);
	sigaddset(&set, SIGTERM);
	sigaddset(&set, SIGINT);
	sigaddset(&set, SIGIO);
	if (sigprocmask(SIG_BLOCK, &set, NULL) < 0)
		fatal("sigprocmask");
	g.sig_fd = signalfd(-1, &set, SFD_NONBLOCK | SFD_CLOEXEC);
	if (g.sig_fd < 0)
		fatal("signalfd");
	signal(SIGPIPE, SIG_IGN); /* a vanished host or child shows up as EPIPE instead */
}

static void __attribute__((noreturn)) usage(const char *why)
{
	fprintf(stderr,
		"clade-agent: %s\n"
		"usage: clade-agent                     (as PID 1 in a clade guest)\n"
		"       clade-agent --fd N --token HEX64 [--id ID]\n"
		"       clade-agent --socket PATH --token HEX64 [--id ID]\n",
		why);
	exit(2);
}

static int connect_unix(const char *path)
{
	struct sockaddr_un sa = {.sun_family = AF_UNIX};
	if (strlen(path) >= sizeof sa.sun_path)
		usage("socket path too long");
	strcpy(sa.sun_path, path);
	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0 || connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0)
		fatal("connect");
	return fd;
}

static void default_cwd_dev(void)
{
	struct stat st;
	if (stat("/root", &st) == 0 && S_ISDIR(st.st_mode) && access("/root", X_OK) == 0)
		strcpy(g.default_cwd, "/root");
	else if (!getcwd(g.default_cwd, sizeof g.default_cwd))
		strcpy(g.default_cwd, "/");
}

/* Development mode: serve an already-open stream, without any init duties. */
static void setup_dev(int argc, char **argv)
{
	int fd = -1;
	bool have_token = false;
	for (int i = 1; i < argc; i++) {
		const char *opt = argv[i], *val = i + 1 < argc ? argv[i + 1] : NULL;
		if (!val)
			usage("missing option value");
		i++;
		if (strcmp(opt, "--fd") == 0) {
			char *end;
			long n = strtol(val, &end, 10);
			if (*end || n < 0 || n > INT32_MAX)
				usage("bad --fd");
			fd = (int)n;
		} else if (strcmp(opt, "--socket") == 0) {
			fd = connect_unix(val);
		} else if (strcmp(opt, "--token") == 0) {
			have_token = parse_token_hex(val, g.token);
		} else if (strcmp(opt, "--id") == 0 && strlen(val) <= SANDBOX_ID_MAX) {
			strcpy(g.sandbox_id, val);
		} else {
			usage("bad option");
		}
	}
	if (fd < 0 || !have_token)
		usage("need --fd or --socket, and --token with 64 hex digits");
	if (fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK) < 0)
		fatal("fcntl on the host fd");
	/* Adopt orphans of our commands so they are reaped here, as under init. */
	prctl(PR_SET_CHILD_SUBREAPER, 1);
	default_cwd_dev();
	g.port_fd = fd;
	g.connected = true;
}

int main(int argc, char **argv)
{
	umask(0); /* request modes are applied exactly; commands get 022 back */
	if (argc > 1) {
		setup_dev(argc, argv);
		boot_fill_std_fds();
	} else if (getpid() == 1) {
		g.pid1 = true;
		boot_pid1();
		net_boot();
		strcpy(g.default_cwd, "/root");
	} else {
		usage("not PID 1; use --fd or --socket for development mode");
	}
	setup_signals();
	if (g.pid1)
		g.port_fd = boot_open_port();
	log_msg("serving (%s mode)", g.pid1 ? "init" : "development");
	if (g.pid1) {
		fcntl(g.port_fd, F_SETOWN, getpid());
		port_async(true);
		reconnect();
	}
	serve();
}
