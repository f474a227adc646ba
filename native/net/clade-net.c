/*
 * clade-net: one sandbox's network on the host side.
 *
 * A VM's network device (QEMU's `-netdev stream`, clade-vmm's virtio-net)
 * connects to this process's unix socket and exchanges Ethernet frames, each
 * preceded by its length as a 32-bit big-endian number. clade-net starts
 * passt (Debian's user-mode TCP/IP stack) on a socket pair and relays frames
 * between the VM and passt, and on the way:
 *
 *  - enforces the egress policy: an IPv4 packet from the guest reaches passt
 *    (which opens host sockets for it) only if its destination is allowed;
 *    a refused TCP connection is answered with a reset, anything else refused
 *    is dropped. IPv6 and other protocols never pass.
 *  - answers the guest's DNS (10.0.2.3, UDP): names outside the allow-list get
 *    NXDOMAIN without any query leaving the host; allowed names are resolved
 *    by the host's resolver, and the IPv4 addresses in the answer become
 *    allowed destinations for this sandbox.
 *  - lets several VM processes of one sandbox connect (a qemu fork's parent
 *    continues in a new process): frames from passt go to the client that
 *    sent last, else the oldest one. The process exits when its last client
 *    is gone, so a VM that dies takes its network with it.
 *
 * Never reachable, whatever the policy: the host's loopback, link-local
 * (cloud metadata), multicast and reserved ranges, the guest's own subnet;
 * the host's own addresses only when the allow-list names exactly that address.
 *
 * Usage: clade-net --socket PATH --passt PATH --egress none|all|list
 *          [--allow A.B.C.D[/N]]... [--allow-name NAME|*.NAME]...
 *          [--dns IP[:PORT]] [--tcp HOSTPORT:GUESTPORT]...
 * Runs as nobody once its sockets are open (when started as root), under a
 * seccomp filter that allows only relaying (sandbox.h).
 * Prints "ready" on stdout once passt runs (with its forwarded ports bound)
 * and the socket listens. Exit status: 0 when the last client left, 2 bad
 * usage, 3 passt failed (its last words go to stderr), 4 a system call failed.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <ifaddrs.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <grp.h>
#include <sys/prctl.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "net.h"
#include "sandbox.h"

#define MAX_CLIENTS 4
#define FIRST_CLIENT_MS 120000 /* a VM that never connects: its owner died while starting it */
#define READY_MS 10000

static void die_errno(const char *what)
{
	fprintf(stderr, "clade-net: %s: %s\n", what, strerror(errno));
	exit(4);
}

static void usage(const char *why)
{
	fprintf(stderr, "clade-net: %s\n", why);
	exit(2);
}

static int64_t now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* ---- frame streams ---- */

struct stream {
	int fd;
	uint8_t rbuf[4 + NET_FRAME_MAX];
	size_t rlen;
	uint8_t *wbuf;
	size_t wcap, whead, wlen; /* bytes wbuf[whead .. whead+wlen) are pending */
};

static void stream_init(struct stream *s, int fd, size_t wcap)
{
	s->fd = fd;
	s->rlen = 0;
	s->wcap = wcap;
	s->whead = s->wlen = 0;
	s->wbuf = malloc(wcap);
	if (!s->wbuf)
		die_errno("malloc");
}

static void stream_free(struct stream *s)
{
	if (s->fd >= 0)
		close(s->fd);
	s->fd = -1;
	free(s->wbuf);
	s->wbuf = NULL;
}

/* Writes what is pending; false if the peer is gone. */
static bool stream_flush(struct stream *s)
{
	while (s->wlen) {
		ssize_t n = send(s->fd, s->wbuf + s->whead, s->wlen, MSG_NOSIGNAL | MSG_DONTWAIT);
		if (n < 0)
			return errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR;
		s->whead += (size_t)n;
		s->wlen -= (size_t)n;
	}
	s->whead = 0;
	return true;
}

/* Queues one frame whole, or drops it whole when the peer is not keeping up (never half a frame). */
static void stream_send(struct stream *s, const uint8_t *frame, size_t len)
{
	if (s->fd < 0)
		return;
	if (s->whead + s->wlen + 4 + len > s->wcap) {
		memmove(s->wbuf, s->wbuf + s->whead, s->wlen);
		s->whead = 0;
	}
	if (s->wlen + 4 + len > s->wcap)
		return;
	uint8_t *p = s->wbuf + s->whead + s->wlen;
	uint32_t be = htonl((uint32_t)len);
	memcpy(p, &be, 4);
	memcpy(p + 4, frame, len);
	s->wlen += 4 + len;
	stream_flush(s);
}

/*
 * Reads what is available and calls fn for every whole frame. Returns false
 * when the peer closed, failed, or sent a length no Ethernet frame has.
 */
static bool stream_read(struct stream *s, void (*fn)(void *ctx, uint8_t *frame, size_t len), void *ctx)
{
	for (;;) {
		ssize_t n = recv(s->fd, s->rbuf + s->rlen, sizeof s->rbuf - s->rlen, MSG_DONTWAIT);
		if (n == 0)
			return false;
		if (n < 0)
			return errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR;
		s->rlen += (size_t)n;
		size_t off = 0;
		while (s->rlen - off >= 4) {
			uint32_t be;
			memcpy(&be, s->rbuf + off, 4);
			uint32_t len = ntohl(be);
			if (len > NET_FRAME_MAX)
				return false;
			if (s->rlen - off < 4 + len)
				break;
			if (len >= NET_ETH_HLEN)
				fn(ctx, s->rbuf + off + 4, len);
			off += 4 + len;
		}
		memmove(s->rbuf, s->rbuf + off, s->rlen - off);
		s->rlen -= off;
	}
}

/* ---- state ---- */

struct client {
	struct stream s;
	uint64_t order;     /* connection order */
	uint64_t last_sent; /* sequence of the last frame it sent, 0 if none */
};

static struct {
	const char *socket_path;
	const char *passt_path;
	struct net_policy policy;
	uint32_t dns_upstream;
	uint16_t dns_port;
	struct sockaddr_in dns_addr;
	char tcp_specs[NET_MAX_PORTS][32];
	uint16_t host_ports[NET_MAX_PORTS];
	int nports;

	int listen_fd, passt_err_fd;
	pid_t passt_pid;
	struct stream passt;
	struct client clients[MAX_CLIENTS];
	int nclients;
	uint64_t next_order, frame_seq;
	bool had_client;
	char passt_err[2048];
	size_t passt_err_len;
	struct net_dns_pending pending[NET_DNS_PENDING];
	int dns_fds[NET_DNS_PENDING]; /* the socket each pending query was asked from, -1 when none */
} st;

/* ---- passt ---- */

static void start_passt(void)
{
	int sv[2], errpipe[2];
	if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0 || pipe2(errpipe, O_CLOEXEC) < 0)
		die_errno("socketpair");
	char *argv[64];
	int n = 0;
	argv[n++] = (char *)st.passt_path;
	char *fixed[] = {"-f", "-q", "-4", "-F", "3", "-a", NET_GUEST_IP_STR, "-n", "24", "-g", NET_GATEWAY_STR,
			 "--no-map-gw", "-M", NET_GATEWAY_MAC_STR, "--no-dhcp", "--no-ndp", "--no-dhcpv6", "--no-ra",
			 "-D", NET_DNS_STR, "--no-dhcp-dns", "--no-dhcp-search"};
	for (size_t i = 0; i < sizeof fixed / sizeof fixed[0]; i++)
		argv[n++] = fixed[i];
	for (int i = 0; i < st.nports; i++) {
		argv[n++] = "-t";
		argv[n++] = st.tcp_specs[i];
	}
	if (st.nports == 0) {
		argv[n++] = "-t";
		argv[n++] = "none";
	}
	argv[n++] = "-u";
	argv[n++] = "none";
	argv[n] = NULL;
	pid_t pid = fork();
	if (pid < 0)
		die_errno("fork");
	if (pid == 0) {
		/* passt gets the socket pair's end as fd 3 and nothing else of ours. */
		if (dup2(sv[1], 3) < 0 || dup2(errpipe[1], 2) < 0)
			_exit(127);
		int devnull = open("/dev/null", O_RDWR);
		if (devnull >= 0) {
			dup2(devnull, 0);
			dup2(devnull, 1);
		}
		for (int fd = 4; fd < 1024; fd++)
			close(fd);
		signal(SIGPIPE, SIG_DFL);
		execv(st.passt_path, argv);
		fprintf(stderr, "cannot run %s: %s\n", st.passt_path, strerror(errno));
		_exit(127);
	}
	close(sv[1]);
	close(errpipe[1]);
	st.passt_pid = pid;
	st.passt_err_fd = errpipe[0];
	fcntl(errpipe[0], F_SETFL, O_NONBLOCK);
	fcntl(sv[0], F_SETFL, O_NONBLOCK);
	stream_init(&st.passt, sv[0], 1 << 20);
}

/* Keeps the last bytes passt wrote to stderr, for the reason it failed. */
static void read_passt_err(void)
{
	char buf[512];
	ssize_t n;
	while ((n = read(st.passt_err_fd, buf, sizeof buf)) > 0) {
		for (ssize_t i = 0; i < n; i++) {
			if (st.passt_err_len == sizeof st.passt_err - 1) {
				memmove(st.passt_err, st.passt_err + 1024, st.passt_err_len - 1024);
				st.passt_err_len -= 1024;
			}
			st.passt_err[st.passt_err_len++] = buf[i];
		}
	}
	st.passt_err[st.passt_err_len] = '\0';
}

static void __attribute__((noreturn)) passt_failed(int status)
{
	read_passt_err();
	/* passt's logging to a missing syslog is noise; keep its own words. */
	char *line = strtok(st.passt_err, "\n");
	fprintf(stderr, "clade-net: passt exited (%s %d)", WIFEXITED(status) ? "status" : "signal",
		WIFEXITED(status) ? WEXITSTATUS(status) : WTERMSIG(status));
	for (; line; line = strtok(NULL, "\n"))
		if (!strstr(line, "syslog") && !strstr(line, "Don't run as root"))
			fprintf(stderr, ": %s", line);
	fprintf(stderr, "\n");
	exit(3);
}

static bool passt_exited(void)
{
	int status;
	pid_t r = waitpid(st.passt_pid, &status, WNOHANG);
	if (r == st.passt_pid)
		passt_failed(status);
	return false;
}

/* True once every forwarded port listens on the host's loopback (passt binds them before it serves). */
static bool ports_listening(void)
{
	if (st.nports == 0)
		return true;
	FILE *f = fopen("/proc/net/tcp", "r");
	if (!f)
		return false;
	bool seen[NET_MAX_PORTS] = {false};
	char line[512];
	while (fgets(line, sizeof line, f)) {
		unsigned addr, port, state;
		if (sscanf(line, " %*d: %8X:%4X %*8X:%*4X %2X", &addr, &port, &state) != 3 || state != 0x0A)
			continue;
		if (addr != htonl(INADDR_LOOPBACK))
			continue;
		for (int i = 0; i < st.nports; i++)
			if (st.host_ports[i] == port)
				seen[i] = true;
	}
	fclose(f);
	for (int i = 0; i < st.nports; i++)
		if (!seen[i])
			return false;
	return true;
}

static void wait_passt_ready(void)
{
	int64_t deadline = now_ms() + READY_MS;
	while (!ports_listening()) {
		passt_exited();
		if (now_ms() > deadline) {
			fprintf(stderr, "clade-net: passt did not bind its forwarded ports within %d ms\n", READY_MS);
			kill(st.passt_pid, SIGKILL);
			exit(3);
		}
		usleep(2000);
	}
	usleep(20000); /* a port someone else held: passt gives up at once, so look once more */
	passt_exited();
}

/* ---- frames from the guest ---- */

static void frame_to_guest(const uint8_t *frame, size_t len);
static void ask_upstream(const struct net_dns_out *out);

static void send_to_passt(const uint8_t *frame, size_t len)
{
	stream_send(&st.passt, frame, len);
}

static void client_frame(void *ctx, uint8_t *frame, size_t len)
{
	struct client *c = ctx;
	c->last_sent = ++st.frame_seq;
	struct net_verdict v = net_filter_guest_frame(&st.policy, frame, len);
	switch (v.action) {
	case NET_PASS:
		send_to_passt(frame, len);
		break;
	case NET_REPLY:
		frame_to_guest(v.reply, v.reply_len);
		break;
	case NET_DNS_QUERY: {
		struct net_dns_out out;
		net_dns_query(&st.policy, st.pending, NET_DNS_PENDING, frame, len, now_ms(), st.dns_upstream != 0, &out);
		if (out.reply_len)
			frame_to_guest(out.reply, out.reply_len);
		if (out.upstream_len)
			ask_upstream(&out);
		break;
	}
	case NET_DROP:
		break;
	}
}

/* Frames go to the client that sent last (the VM process that runs now), else the oldest. */
static void frame_to_guest(const uint8_t *frame, size_t len)
{
	struct client *best = NULL;
	for (int i = 0; i < st.nclients; i++) {
		struct client *c = &st.clients[i];
		if (!best || c->last_sent > best->last_sent || (c->last_sent == best->last_sent && c->order < best->order))
			best = c;
	}
	if (best)
		stream_send(&best->s, frame, len);
}

static void passt_frame(void *ctx, uint8_t *frame, size_t len)
{
	(void)ctx;
	frame_to_guest(frame, len);
}

static void drop_client(int i)
{
	stream_free(&st.clients[i].s);
	st.clients[i] = st.clients[--st.nclients];
}

static void accept_client(void)
{
	int fd = accept4(st.listen_fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
	if (fd < 0)
		return;
	if (st.nclients == MAX_CLIENTS) {
		close(fd);
		return;
	}
	struct client *c = &st.clients[st.nclients++];
	memset(c, 0, sizeof *c);
	stream_init(&c->s, fd, 512 * 1024);
	c->order = ++st.next_order;
	st.had_client = true;
}

/*
 * Each query goes upstream from a socket of its own, connected to the
 * resolver: a fresh source port per query, so a forged answer has to guess
 * the port as well as the 16-bit id (a socket kept for life would leave only the id).
 */
static void ask_upstream(const struct net_dns_out *out)
{
	int i = out->slot;
	if (st.dns_fds[i] >= 0)
		close(st.dns_fds[i]); /* the entry was answered and asked again before the loop came round */
	st.dns_fds[i] = -1;
	int fd = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (fd < 0 || connect(fd, (struct sockaddr *)&st.dns_addr, sizeof st.dns_addr) < 0 ||
	    send(fd, out->upstream, out->upstream_len, MSG_DONTWAIT | MSG_NOSIGNAL) < 0) {
		if (fd >= 0)
			close(fd);
		st.pending[i].used = false; /* the guest asks again */
		return;
	}
	st.dns_fds[i] = fd;
}

/* Datagrams on query i's socket: only that query's entry can take them. */
static void dns_answer(int i)
{
	uint8_t buf[NET_DNS_MAX];
	while (st.pending[i].used) {
		ssize_t n = recv(st.dns_fds[i], buf, sizeof buf, MSG_DONTWAIT);
		if (n < 0) {
			if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)
				st.pending[i].used = false; /* refused by the resolver's host: the guest asks again */
			return;
		}
		struct net_dns_out out;
		net_dns_answer(&st.policy, &st.pending[i], 1, buf, (size_t)n, &out);
		if (out.reply_len)
			frame_to_guest(out.reply, out.reply_len);
	}
}

/* Closes the sockets of queries answered or expired. */
static void close_finished_queries(void)
{
	for (int i = 0; i < NET_DNS_PENDING; i++)
		if (st.dns_fds[i] >= 0 && !st.pending[i].used) {
			close(st.dns_fds[i]);
			st.dns_fds[i] = -1;
		}
}

/* ---- set-up ---- */

static void parse_args(int argc, char **argv)
{
	net_policy_init(&st.policy);
	for (int i = 1; i < argc; i++) {
		const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
		if (!v)
			usage("every option takes a value");
		i++;
		if (!strcmp(a, "--socket"))
			st.socket_path = v;
		else if (!strcmp(a, "--passt"))
			st.passt_path = v;
		else if (!strcmp(a, "--egress")) {
			if (!strcmp(v, "all"))
				st.policy.mode = NET_EGRESS_ALL;
			else if (!strcmp(v, "none"))
				st.policy.mode = NET_EGRESS_NONE;
			else if (!strcmp(v, "list"))
				st.policy.mode = NET_EGRESS_LIST;
			else
				usage("--egress is all, none or list");
		} else if (!strcmp(a, "--allow")) {
			if (!net_policy_add_cidr(&st.policy, v))
				usage("--allow takes an IPv4 address or CIDR (at most 64)");
		} else if (!strcmp(a, "--allow-name")) {
			if (!net_policy_add_name(&st.policy, v))
				usage("--allow-name takes a host name or *.name (at most 64)");
		} else if (!strcmp(a, "--dns")) {
			char host[64];
			unsigned port = 53;
			if (strlen(v) >= sizeof host)
				usage("--dns takes IP[:PORT]");
			strcpy(host, v);
			char *colon = strchr(host, ':');
			if (colon) {
				*colon = '\0';
				char *end;
				unsigned long p = strtoul(colon + 1, &end, 10);
				if (*end || p == 0 || p > 65535)
					usage("--dns takes IP[:PORT]");
				port = (unsigned)p;
			}
			struct in_addr in;
			if (inet_pton(AF_INET, host, &in) != 1)
				usage("--dns takes an IPv4 address");
			st.dns_upstream = ntohl(in.s_addr);
			st.dns_port = (uint16_t)port;
		} else if (!strcmp(a, "--tcp")) {
			unsigned h, g;
			char tail;
			if (st.nports == NET_MAX_PORTS || sscanf(v, "%u:%u%c", &h, &g, &tail) != 2 || !h || !g || h > 65535 || g > 65535)
				usage("--tcp takes HOSTPORT:GUESTPORT (at most 32)");
			st.host_ports[st.nports] = (uint16_t)h;
			net_policy_add_forwarded(&st.policy, (uint16_t)g);
			snprintf(st.tcp_specs[st.nports], sizeof st.tcp_specs[0], "127.0.0.1/%u:%u", h, g);
			st.nports++;
		} else
			usage("unknown option");
	}
	if (!st.socket_path || !st.passt_path)
		usage("--socket and --passt are required");
	if (strlen(st.socket_path) >= sizeof(((struct sockaddr_un *)0)->sun_path))
		usage("the socket path is too long");
}

/* The host's own addresses are reachable only when the allow-list names exactly that address. */
static void note_host_addresses(void)
{
	struct ifaddrs *ifs;
	if (getifaddrs(&ifs) < 0)
		die_errno("getifaddrs");
	for (struct ifaddrs *i = ifs; i; i = i->ifa_next)
		if (i->ifa_addr && i->ifa_addr->sa_family == AF_INET)
			if (!net_policy_add_host_address(&st.policy, ntohl(((struct sockaddr_in *)i->ifa_addr)->sin_addr.s_addr)))
				usage("this host has more IPv4 addresses than clade-net can keep unreachable (256); remove some or ask for no network");
	freeifaddrs(ifs);
}

static void open_dns(void)
{
	for (int i = 0; i < NET_DNS_PENDING; i++)
		st.dns_fds[i] = -1;
	st.dns_addr = (struct sockaddr_in){.sin_family = AF_INET, .sin_port = htons(st.dns_port), .sin_addr.s_addr = htonl(st.dns_upstream)};
}

static void listen_socket(void)
{
	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	struct sockaddr_un sa = {.sun_family = AF_UNIX};
	strcpy(sa.sun_path, st.socket_path);
	unlink(st.socket_path);
	mode_t old = umask(077);
	if (fd < 0 || bind(fd, (struct sockaddr *)&sa, sizeof sa) < 0 || listen(fd, 8) < 0)
		die_errno("listen");
	umask(old);
	st.listen_fd = fd;
}

/*
 * Once its sockets are open, clade-net needs no privilege: it only moves
 * frames between descriptors it holds. Run as root, it becomes nobody (as
 * passt does), and it can never gain privileges again.
 */
static void drop_privileges(void)
{
	if (getuid() == 0 || geteuid() == 0) {
		if (setgroups(0, NULL) < 0 || setgid(65534) < 0 || setuid(65534) < 0)
			die_errno("dropping root");
	}
	if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0)
		die_errno("PR_SET_NO_NEW_PRIVS");
}

int main(int argc, char **argv)
{
	signal(SIGPIPE, SIG_IGN);
	parse_args(argc, argv);
	note_host_addresses();
	open_dns();
	start_passt();
	wait_passt_ready();
	/* passt learns where the guest is before any VM has said a word (net_guest_announcement). */
	uint8_t announce[NET_ANNOUNCE_LEN];
	net_guest_announcement(announce);
	send_to_passt(announce, sizeof announce);
	listen_socket();
	drop_privileges();
	printf("ready\n");
	fflush(stdout);
	int devnull = open("/dev/null", O_WRONLY);
	if (devnull >= 0) {
		dup2(devnull, 1);
		close(devnull);
	}
	if (!net_sandbox_enter(st.passt_pid))
		die_errno("seccomp filter");
	int64_t first_deadline = now_ms() + FIRST_CLIENT_MS;

	for (;;) {
		/* listen, passt, passt's stderr, then the clients, then one socket per DNS query in flight */
		struct pollfd p[3 + MAX_CLIENTS + NET_DNS_PENDING];
		int query_of[NET_DNS_PENDING];
		int n = 0;
		p[n++] = (struct pollfd){.fd = st.listen_fd, .events = POLLIN};
		p[n++] = (struct pollfd){.fd = st.passt.fd, .events = POLLIN | (st.passt.wlen ? POLLOUT : 0)};
		p[n++] = (struct pollfd){.fd = st.passt_err_fd, .events = POLLIN};
		for (int i = 0; i < st.nclients; i++)
			p[n++] = (struct pollfd){.fd = st.clients[i].s.fd, .events = POLLIN | (st.clients[i].s.wlen ? POLLOUT : 0)};
		int first_query = n;
		for (int i = 0; i < NET_DNS_PENDING; i++)
			if (st.dns_fds[i] >= 0) {
				query_of[n - first_query] = i;
				p[n++] = (struct pollfd){.fd = st.dns_fds[i], .events = POLLIN};
			}
		if (poll(p, (nfds_t)n, 1000) < 0 && errno != EINTR)
			die_errno("poll");
		passt_exited();
		if (p[2].revents & (POLLIN | POLLHUP))
			read_passt_err();
		for (int k = first_query; k < n; k++)
			if (p[k].revents & (POLLIN | POLLERR))
				dns_answer(query_of[k - first_query]);
		if (p[1].revents & POLLOUT)
			stream_flush(&st.passt);
		if (p[1].revents & (POLLIN | POLLHUP | POLLERR)) {
			if (!stream_read(&st.passt, passt_frame, NULL)) {
				int status;
				kill(st.passt_pid, SIGKILL);
				waitpid(st.passt_pid, &status, 0);
				passt_failed(status);
			}
		}
		/* Clients by index from the end, as drop_client moves the last one into a freed slot. */
		for (int i = st.nclients - 1; i >= 0; i--) {
			short re = p[3 + i].revents;
			struct client *c = &st.clients[i];
			bool ok = true;
			if (re & POLLOUT)
				ok = stream_flush(&c->s);
			if (ok && (re & (POLLIN | POLLHUP | POLLERR)))
				ok = stream_read(&c->s, client_frame, c);
			if (!ok)
				drop_client(i);
		}
		if (p[0].revents & POLLIN)
			accept_client();
		if (st.had_client && st.nclients == 0)
			break;
		if (!st.had_client && now_ms() > first_deadline) {
			fprintf(stderr, "clade-net: no VM connected within %d s\n", FIRST_CLIENT_MS / 1000);
			break;
		}
		net_dns_expire(st.pending, NET_DNS_PENDING, now_ms());
		close_finished_queries();
	}
	/* The socket file stays: the sandbox's run directory, which holds it, is removed by its owner. */
	kill(st.passt_pid, SIGTERM);
	return 0;
}
