/* exec.c: EXEC, STDIN and SIGNAL; output streaming, reaping and timeouts. */
#include "agent.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#define STDIN_QUEUE_MAX (4u * 1024 * 1024) /* unread STDIN kept per command */
#define DRAIN_MAX_READS 20                  /* > 1 MiB, the largest pipe a child can ask for */

extern char **environ;

struct chunk {
	struct chunk *next;
	size_t len, off;
	uint8_t data[];
};

struct exec {
	bool used;
	uint32_t id;
	pid_t pid; /* also the process group id: the child calls setsid() */
	int out_fd, err_fd, in_fd;
	struct chunk *in_head, *in_tail;
	size_t in_queued;
	bool in_eof;      /* close stdin once the queue is flushed */
	int64_t deadline; /* CLOCK_MONOTONIC ms, or -1 */
	bool timed_out;
};

static struct exec execs[MAX_EXECS];

static struct exec *find_exec(uint32_t id)
{
	for (size_t i = 0; i < MAX_EXECS; i++)
		if (execs[i].used && execs[i].id == id)
			return &execs[i];
	return NULL;
}

static void close_fd(int *fd)
{
	if (*fd >= 0)
		close(*fd);
	*fd = -1;
}

static void drop_stdin_queue(struct exec *e)
{
	while (e->in_head) {
		struct chunk *c = e->in_head;
		e->in_head = c->next;
		free(c);
	}
	e->in_tail = NULL;
	e->in_queued = 0;
}

static void release(struct exec *e)
{
	close_fd(&e->out_fd);
	close_fd(&e->err_fd);
	close_fd(&e->in_fd);
	drop_stdin_queue(e);
	e->used = false;
}

/* ---- the child side of fork ---- */

enum stage { STAGE_SETUP, STAGE_CWD, STAGE_EXEC };

struct spawn_fail {
	int stage;
	int err;
};

static void __attribute__((noreturn)) child_fail(int rep_fd, enum stage stage)
{
	struct spawn_fail f = {stage, errno};
	ssize_t w = write(rep_fd, &f, sizeof f);
	(void)w; /* if even this fails, the parent sees a start and then exit code 127 */
	_exit(127);
}

static bool same_name(const char *a, const char *b)
{
	while (*a && *a == *b && *a != '=') {
		a++;
		b++;
	}
	return *a == '=' && *b == '=';
}

/* Base variables, CLADE_SANDBOX_ID, then the request's ENV; the last definition of a name wins. */
static char **build_env(const struct req *r)
{
	static const char *const base[] = {
		"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
		"HOME=/root",
		"LANG=C.UTF-8",
	};
	size_t nbase = sizeof base / sizeof base[0], n = nbase + 1 + r->envc;
	char **all = malloc((n + 1) * sizeof *all);
	char *id = malloc(sizeof "CLADE_SANDBOX_ID=" + strlen(g.sandbox_id));
	if (!all || !id)
		return NULL;
	sprintf(id, "CLADE_SANDBOX_ID=%s", g.sandbox_id);
	for (size_t i = 0; i < nbase; i++)
		all[i] = (char *)base[i];
	all[nbase] = id;
	for (size_t i = 0; i < r->envc; i++)
		all[nbase + 1 + i] = (char *)r->env[i];
	size_t k = 0;
	for (size_t i = 0; i < n; i++) {
		bool overridden = false;
		for (size_t j = i + 1; j < n && !overridden; j++)
			overridden = same_name(all[i], all[j]);
		if (!overridden)
			all[k++] = all[i];
	}
	all[k] = NULL;
	return all;
}

static void __attribute__((noreturn)) child(const struct req *r, const char *cwd, int in_fd, int out_fd,
					    int err_fd, int rep_fd)
{
	sigset_t none;
	sigemptyset(&none);
	sigprocmask(SIG_SETMASK, &none, NULL);
	signal(SIGPIPE, SIG_DFL); /* ignored dispositions survive exec */
	umask(022);
	setsid();
	if (in_fd < 0)
		in_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
	if (in_fd < 0 || dup2(in_fd, 0) < 0 || dup2(out_fd, 1) < 0 || dup2(err_fd, 2) < 0)
		child_fail(rep_fd, STAGE_SETUP);
	if (chdir(cwd) < 0)
		child_fail(rep_fd, STAGE_CWD);
	char **env = build_env(r);
	if (!env) {
		errno = ENOMEM;
		child_fail(rep_fd, STAGE_SETUP);
	}
	environ = env; /* execvp searches the PATH of the new environment */
	if (r->has[F_SHELL]) {
		char *argv[] = {"sh", "-c", (char *)REQ_STR(r, F_SHELL), NULL};
		execv("/bin/sh", argv);
	} else {
		execvp(r->argv[0], (char *const *)r->argv);
	}
	child_fail(rep_fd, STAGE_EXEC);
}

/* ---- starting a command ---- */

static bool env_valid(const struct req *r)
{
	for (size_t i = 0; i < r->envc; i++)
		if (r->env[i][0] == '=' || !strchr(r->env[i], '='))
			return false;
	return true;
}

static void reply_spawn_fail(const struct req *r, const struct spawn_fail *f, const char *cwd)
{
	const char *prog = r->has[F_SHELL] ? "/bin/sh" : r->argv[0];
	const char *code = f->err == ENOENT ? "not_found" : (f->err == EACCES || f->err == EPERM) ? "permission" : "io";
	if (f->stage == STAGE_EXEC)
		send_error(r->id, code, f->err, "cannot run %s: %s", prog, strerror(f->err));
	else if (f->stage == STAGE_CWD)
		send_errno(r->id, f->err, "cannot enter directory", cwd);
	else
		send_error(r->id, "io", f->err, "cannot set up the command: %s", strerror(f->err));
}

static void set_nonblock(int fd)
{
	if (fd >= 0)
		fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
}

/* Pipes are [read, write]; all are close-on-exec, the child dup2s its ends onto 0-2. */
static void spawn(struct exec *e, const struct req *r, const char *cwd)
{
	int in[2] = {-1, -1}, out[2] = {-1, -1}, err[2] = {-1, -1}, rep[2] = {-1, -1};
	bool stdin_open = r->has[F_STDIN_OPEN] && r->num[F_STDIN_OPEN] == 1;
	pid_t pid = -1;
	if (pipe2(out, O_CLOEXEC) == 0 && pipe2(err, O_CLOEXEC) == 0 && pipe2(rep, O_CLOEXEC) == 0 &&
	    (!stdin_open || pipe2(in, O_CLOEXEC) == 0))
		pid = fork();
	if (pid == 0)
		child(r, cwd, in[0], out[1], err[1], rep[1]);
	int saved = errno;
	close_fd(&in[0]);
	close_fd(&out[1]);
	close_fd(&err[1]);
	close_fd(&rep[1]);
	struct spawn_fail f = {STAGE_SETUP, saved};
	ssize_t n = 0;
	if (pid > 0) {
		/* EOF means exec succeeded (the pipe is close-on-exec); a record means it failed. */
		do
			n = read(rep[0], &f, sizeof f);
		while (n < 0 && errno == EINTR);
	}
	close_fd(&rep[0]);
	if (pid < 0 || n == (ssize_t)sizeof f) {
		if (pid > 0)
			waitpid(pid, NULL, 0);
		close_fd(&in[1]);
		close_fd(&out[0]);
		close_fd(&err[0]);
		reply_spawn_fail(r, &f, cwd);
		return;
	}
	set_nonblock(out[0]);
	set_nonblock(err[0]);
	set_nonblock(in[1]);
	*e = (struct exec){.used = true, .id = r->id, .pid = pid, .out_fd = out[0], .err_fd = err[0],
			   .in_fd = in[1], .deadline = -1};
	uint64_t ms = r->has[F_TIMEOUT_MS] ? r->num[F_TIMEOUT_MS] : 0;
	if (ms > 0 && ms < (uint64_t)INT64_MAX / 2)
		e->deadline = now_ms() + (int64_t)ms;
	struct body b;
	body_start(&b);
	body_u64(&b, F_PID, (uint64_t)pid);
	send_body(T_OK, r->id, &b);
}

void exec_start(const struct req *r)
{
	if (r->has[F_ARGV] == r->has[F_SHELL]) {
		send_error(r->id, "bad_request", 0, "EXEC needs either ARGV or SHELL");
		return;
	}
	if (!env_valid(r)) {
		send_error(r->id, "bad_request", 0, "ENV entries must look like NAME=value");
		return;
	}
	if (find_exec(r->id)) {
		send_error(r->id, "bad_request", 0, "request id %u already names a running command", r->id);
		return;
	}
	struct exec *e = NULL;
	for (size_t i = 0; i < MAX_EXECS && !e; i++)
		if (!execs[i].used)
			e = &execs[i];
	if (!e) {
		send_error(r->id, "busy", 0, "too many running commands (at most %d)", MAX_EXECS);
		return;
	}
	char cwd[PATH_MAX];
	if (!r->has[F_CWD])
		strcpy(cwd, g.default_cwd);
	else if (!path_resolve(REQ_STR(r, F_CWD), cwd)) {
		send_error(r->id, "bad_request", 0, "CWD must be a non-empty path of at most 4095 bytes");
		return;
	}
	spawn(e, r, cwd);
}

/* ---- output ---- */

/* Reads one chunk from a command's stdout/stderr; returns false once the pipe is done. */
static bool pump(struct exec *e, int *fd, uint8_t type)
{
	uint8_t *buf = out_buffer();
	ssize_t n = read(*fd, buf, OUT_CHUNK);
	if (n > 0) {
		send_frame(type, e->id, buf, (size_t)n);
		return true;
	}
	if (n < 0 && (errno == EAGAIN || errno == EINTR))
		return false;
	close_fd(fd);
	return false;
}

/* After the reap: take what is already in the pipe, but do not wait for processes left behind. */
static void drain(struct exec *e, int *fd, uint8_t type)
{
	for (int i = 0; i < DRAIN_MAX_READS && *fd >= 0 && pump(e, fd, type); i++)
		;
	close_fd(fd);
}

/* ---- stdin ---- */

/* Writes queued STDIN until the pipe is full; gives up on the pipe when the reader is gone. */
static void flush_stdin(struct exec *e)
{
	while (e->in_head) {
		struct chunk *c = e->in_head;
		ssize_t w = write(e->in_fd, c->data + c->off, c->len - c->off);
		if (w < 0 && (errno == EAGAIN || errno == EINTR))
			return;
		if (w < 0) {
			drop_stdin_queue(e);
			close_fd(&e->in_fd);
			return;
		}
		c->off += (size_t)w;
		e->in_queued -= (size_t)w;
		if (c->off == c->len) {
			e->in_head = c->next;
			if (!e->in_head)
				e->in_tail = NULL;
			free(c);
		}
	}
	if (e->in_eof)
		close_fd(&e->in_fd);
}

static void queue_stdin(struct exec *e, const uint8_t *p, size_t n)
{
	struct chunk *c = malloc(sizeof *c + n);
	if (!c) {
		log_msg("out of memory for stdin of command %u; closing its stdin", e->id);
		e->in_eof = true;
		return;
	}
	*c = (struct chunk){.len = n};
	memcpy(c->data, p, n);
	if (e->in_tail)
		e->in_tail->next = c;
	else
		e->in_head = c;
	e->in_tail = c;
	e->in_queued += n;
}

/* STDIN has no reply, so frames for unknown or finished commands are dropped silently. */
void exec_stdin(const struct req *r)
{
	struct exec *e = find_exec(r->id);
	if (!e || e->in_fd < 0 || e->in_eof)
		return;
	if (r->raw_len == 0) {
		e->in_eof = true;
	} else if (e->in_queued + r->raw_len > STDIN_QUEUE_MAX) {
		log_msg("command %u does not read its stdin; dropping input and closing it", e->id);
		e->in_eof = true;
	} else {
		queue_stdin(e, r->raw, r->raw_len);
	}
	flush_stdin(e);
}

/* ---- signals, reaping, timeouts ---- */

void exec_signal(const struct req *r)
{
	if (!r->has[F_TARGET] || !r->has[F_SIGNAL]) {
		send_error(r->id, "bad_request", 0, "SIGNAL needs TARGET and SIGNAL");
		return;
	}
	uint64_t sig = r->num[F_SIGNAL], target = r->num[F_TARGET];
	if (sig >= NSIG) {
		send_error(r->id, "bad_request", 0, "no such signal %llu", (unsigned long long)sig);
		return;
	}
	struct exec *e = target <= UINT32_MAX ? find_exec((uint32_t)target) : NULL;
	if (!e) {
		send_error(r->id, "not_found", 0, "no running command with id %llu", (unsigned long long)target);
		return;
	}
	/* ESRCH: the group is already gone and the EXIT is on its way. */
	if (kill(-e->pid, (int)sig) < 0 && errno != ESRCH) {
		send_error(r->id, errno == EPERM ? "permission" : "io", errno, "kill: %s", strerror(errno));
		return;
	}
	send_ok_empty(r->id);
}

static void finish(struct exec *e, int status)
{
	drain(e, &e->out_fd, T_STDOUT);
	drain(e, &e->err_fd, T_STDERR);
	struct body b;
	body_start(&b);
	if (WIFSIGNALED(status)) {
		body_u64(&b, F_EXIT_CODE, 128 + (uint64_t)WTERMSIG(status));
		body_u64(&b, F_SIGNAL, (uint64_t)WTERMSIG(status));
	} else {
		body_u64(&b, F_EXIT_CODE, (uint64_t)WEXITSTATUS(status));
	}
	body_u64(&b, F_TIMED_OUT, e->timed_out);
	send_body(T_EXIT, e->id, &b);
	release(e);
}

/* Reaps every exited child (commands and orphans alike); true while children remain. */
bool exec_reap(void)
{
	for (;;) {
		int status;
		pid_t pid = waitpid(-1, &status, WNOHANG);
		if (pid < 0)
			return errno != ECHILD;
		if (pid == 0)
			return true;
		for (size_t i = 0; i < MAX_EXECS; i++)
			if (execs[i].used && execs[i].pid == pid)
				finish(&execs[i], status);
	}
}

int64_t exec_deadline(void)
{
	int64_t d = -1;
	for (size_t i = 0; i < MAX_EXECS; i++)
		if (execs[i].used && execs[i].deadline >= 0 && (d < 0 || execs[i].deadline < d))
			d = execs[i].deadline;
	return d;
}

void exec_check_timeouts(int64_t now)
{
	for (size_t i = 0; i < MAX_EXECS; i++) {
		struct exec *e = &execs[i];
		if (e->used && e->deadline >= 0 && now >= e->deadline) {
			kill(-e->pid, SIGKILL);
			e->timed_out = true;
			e->deadline = -1;
		}
	}
}

/* Development mode: signals the orphans this subreaper adopted (init uses kill(-1) instead). */
static void kill_adopted(int sig)
{
	DIR *d = opendir("/proc");
	if (!d)
		return;
	struct dirent *ent;
	while ((ent = readdir(d))) {
		char path[300], stat[512] = {0};
		snprintf(path, sizeof path, "/proc/%s/stat", ent->d_name);
		int fd = ent->d_name[0] >= '1' && ent->d_name[0] <= '9' ? open(path, O_RDONLY | O_CLOEXEC) : -1;
		if (fd < 0)
			continue;
		ssize_t n = read(fd, stat, sizeof stat - 1);
		close(fd);
		/* "pid (comm) state ppid ...": comm may contain anything, so parse after the last ')'. */
		char *rp = n > 0 ? strrchr(stat, ')') : NULL;
		int ppid;
		if (rp && sscanf(rp + 1, " %*c %d", &ppid) == 1 && ppid == getpid())
			kill(atoi(ent->d_name), sig);
	}
	closedir(d);
}

/* Signals every command's process group, and every other process we are responsible for. */
void exec_kill_all(int sig)
{
	for (size_t i = 0; i < MAX_EXECS; i++)
		if (execs[i].used)
			kill(-execs[i].pid, sig);
	if (g.pid1)
		kill(-1, sig);
	else
		kill_adopted(sig);
}

/* ---- poll plumbing ---- */

enum stream { S_OUT, S_ERR, S_IN };

static struct {
	struct exec *e;
	enum stream s;
} pmap[3 * MAX_EXECS];

static size_t add_poll(struct pollfd *pfd, size_t n, struct exec *e, enum stream s, int fd, short events)
{
	pfd[n] = (struct pollfd){.fd = fd, .events = events};
	pmap[n].e = e;
	pmap[n].s = s;
	return n + 1;
}

size_t exec_pollfds(struct pollfd *pfd, size_t max)
{
	size_t n = 0;
	for (size_t i = 0; i < MAX_EXECS && n + 3 <= max; i++) {
		struct exec *e = &execs[i];
		if (!e->used)
			continue;
		if (e->out_fd >= 0)
			n = add_poll(pfd, n, e, S_OUT, e->out_fd, POLLIN);
		if (e->err_fd >= 0)
			n = add_poll(pfd, n, e, S_ERR, e->err_fd, POLLIN);
		if (e->in_fd >= 0 && e->in_head)
			n = add_poll(pfd, n, e, S_IN, e->in_fd, POLLOUT);
	}
	return n;
}

void exec_handle_poll(const struct pollfd *pfd, size_t n)
{
	for (size_t i = 0; i < n; i++) {
		struct exec *e = pmap[i].e;
		if (!pfd[i].revents || !e->used)
			continue;
		if (pmap[i].s == S_OUT && e->out_fd >= 0)
			pump(e, &e->out_fd, T_STDOUT);
		else if (pmap[i].s == S_ERR && e->err_fd >= 0)
			pump(e, &e->err_fd, T_STDERR);
		else if (pmap[i].s == S_IN && e->in_fd >= 0)
			flush_stdin(e);
	}
}
