/*
 * sandbox_test: clade-net's seccomp filter, in forked children. One child
 * does everything relaying needs under the filter and must exit normally;
 * each of the others makes one call the filter must refuse, and must die of
 * SIGSYS (the filter kills, it never returns an error a bug could ignore).
 */
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/ptrace.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "sandbox.h"

static int checks, failed;
static pid_t passt; /* stands in for clade-net's passt: the one process it may signal */

static void fail(const char *what)
{
	failed++;
	fprintf(stderr, "sandbox_test: %s\n", what);
}

/* Runs fn in a child under the filter; returns its wait status. */
static int under_filter(void (*fn)(void))
{
	pid_t pid = fork();
	if (pid == 0) {
		if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0 || !net_sandbox_enter(passt))
			_exit(100);
		fn();
		exit(0);
	}
	int status = 0;
	waitpid(pid, &status, 0);
	return status;
}

/* ---- what clade-net does, which must work ---- */

static int listen_fd, pipe_w;

static void relaying(void)
{
	int fd = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(9), .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
	if (fd < 0 || connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0)
		_exit(1);
	send(fd, "q", 1, MSG_DONTWAIT | MSG_NOSIGNAL);
	struct pollfd p[2] = {{.fd = fd, .events = POLLIN}, {.fd = listen_fd, .events = POLLIN}};
	poll(p, 2, 10);
	char buf[64];
	recv(fd, buf, sizeof buf, MSG_DONTWAIT);
	close(fd);
	if (accept4(listen_fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC) >= 0)
		_exit(2);
	char *big = malloc(8 << 20); /* mmap */
	if (!big)
		_exit(3);
	memset(big, 1, 8 << 20);
	big = realloc(big, 64 << 20); /* mremap */
	if (!big)
		_exit(4);
	free(big);
	for (int i = 0; i < 1000; i++)
		free(malloc(4096)); /* brk */
	uint16_t id;
	if (getrandom(&id, sizeof id, 0) != sizeof id)
		_exit(5);
	struct timespec ts;
	if (syscall(SYS_clock_gettime, CLOCK_MONOTONIC, &ts) < 0 || clock_gettime(CLOCK_MONOTONIC, &ts) < 0)
		_exit(6);
	if (kill(passt, 0) < 0)
		_exit(7);
	int status;
	waitpid(-1, &status, WNOHANG);
	if (write(pipe_w, "ok", 2) != 2)
		_exit(8);
	usleep(1000);
}

/* ---- what it never does, each of which must kill ---- */

static void open_a_file(void) { open("/etc/hostname", O_RDONLY); }
static void exec_a_program(void)
{
	char *argv[] = {"true", NULL};
	execv("/bin/true", argv);
}
static void unix_socket(void) { socket(AF_UNIX, SOCK_STREAM, 0); }
static void tcp_socket(void) { socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0); }
static void raw_socket(void) { socket(AF_INET, SOCK_RAW, IPPROTO_UDP); }
static void signal_another(void) { kill(getppid(), 0); }
static void executable_memory(void) { mmap(NULL, 4096, PROT_READ | PROT_EXEC, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0); }
static void make_executable(void)
{
	void *p = mmap(NULL, 4096, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	mprotect(p, 4096, PROT_READ | PROT_EXEC);
}
static void trace(void) { ptrace(PTRACE_TRACEME, 0, NULL, NULL); }
static void fork_a_child(void) { syscall(SYS_clone, SIGCHLD, 0, 0, 0, 0); }
static void remove_a_file(void) { unlink("/nonexistent/clade-net-test"); }
static void bind_a_port(void)
{
	int fd = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	struct sockaddr_in sa = {.sin_family = AF_INET};
	bind(fd, (struct sockaddr *)&sa, sizeof sa);
}
#ifdef __x86_64__
static void x32_call(void) { syscall(0x40000000 | SYS_getpid); }
#endif

int main(void)
{
	passt = fork();
	if (passt == 0) {
		pause();
		_exit(0);
	}
	int fds[2];
	if (pipe(fds) < 0)
		return 1;
	pipe_w = fds[1];
	listen_fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	struct sockaddr_un un = {.sun_family = AF_UNIX};
	if (listen_fd < 0 || bind(listen_fd, (struct sockaddr *)&un, sizeof(sa_family_t)) < 0 || listen(listen_fd, 1) < 0)
		return 1; /* an autobound abstract address: nothing on disk */

	checks++;
	int status = under_filter(relaying);
	char got[2] = {0};
	if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
		char why[96];
		snprintf(why, sizeof why, "relaying under the filter: %s %d", WIFEXITED(status) ? "exit" : "signal",
			 WIFEXITED(status) ? WEXITSTATUS(status) : WTERMSIG(status));
		fail(why);
	} else if (read(fds[0], got, 2) != 2 || memcmp(got, "ok", 2))
		fail("relaying under the filter: nothing written");

	struct {
		const char *name;
		void (*fn)(void);
	} refused[] = {
		{"open a file", open_a_file},
		{"exec a program", exec_a_program},
		{"a unix socket", unix_socket},
		{"a TCP socket", tcp_socket},
		{"a raw socket", raw_socket},
		{"signal another process", signal_another},
		{"executable memory", executable_memory},
		{"make memory executable", make_executable},
		{"ptrace", trace},
		{"fork", fork_a_child},
		{"remove a file", remove_a_file},
		{"bind a port", bind_a_port},
#ifdef __x86_64__
		{"an x32 call", x32_call},
#endif
	};
	for (size_t i = 0; i < sizeof refused / sizeof refused[0]; i++) {
		checks++;
		status = under_filter(refused[i].fn);
		if (!WIFSIGNALED(status) || WTERMSIG(status) != SIGSYS) {
			char why[96];
			snprintf(why, sizeof why, "%s was not killed by the filter (status 0x%x)", refused[i].name, status);
			fail(why);
		}
	}
	kill(passt, SIGKILL);
	waitpid(passt, &status, 0);
	printf("sandbox: %s: %d checks, %d failed\n", failed ? "FAIL" : "PASS", checks, failed);
	return failed != 0;
}
