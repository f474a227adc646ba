/*
 * net.c: the guest's network, when the host gave the sandbox one
 * (clade.net=ADDR/PREFIX,GATEWAY,DNS on the kernel command line).
 *
 * The host runs a user-mode stack per sandbox (docs/network.md), so the
 * guest's configuration is static and the same in every sandbox and every
 * fork: nothing to re-address after a fork. What a fork does need: the
 * parent's TCP connections live on in the child's kernel but not in the
 * child's new stack on the host, so FORK_FIXUP resets them (SOCK_DESTROY),
 * and programs see ECONNABORTED at once instead of a silent hang.
 */
#include "agent.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/inet_diag.h>
#include <linux/netlink.h>
#include <linux/sock_diag.h>
#include <net/if.h>
#include <net/route.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define NET_MODULES_DIR "/usr/lib/clade/net-modules"
#define IF_WAIT_MS 5000

static bool net_on;

/* Loads the network modules the image carries (virtio-net and the socket diagnostics SOCK_DESTROY needs), in name order. */
static void load_net_modules(void)
{
	static const char *const names[] = {"01-failover.ko", "02-net_failover.ko", "03-virtio_net.ko", "04-inet_diag.ko", "05-tcp_diag.ko"};
	for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
		char path[256];
		snprintf(path, sizeof path, NET_MODULES_DIR "/%s", names[i]);
		int fd = open(path, O_RDONLY | O_CLOEXEC);
		if (fd < 0 || (syscall(SYS_finit_module, fd, "", 0) < 0 && errno != EEXIST))
			log_msg("network module %s: %s", names[i], strerror(errno));
		if (fd >= 0)
			close(fd);
	}
}

/* The first interface that is not loopback (virtio-net's eth0), waiting for its probe. */
static bool find_interface(char name[IF_NAMESIZE])
{
	int64_t end = now_ms() + IF_WAIT_MS;
	for (;;) {
		struct if_nameindex *ifs = if_nameindex();
		bool found = false;
		for (struct if_nameindex *i = ifs; i && i->if_index && !found; i++) {
			if (strcmp(i->if_name, "lo") != 0) {
				snprintf(name, IF_NAMESIZE, "%s", i->if_name);
				found = true;
			}
		}
		if (ifs)
			if_freenameindex(ifs);
		if (found)
			return true;
		if (now_ms() > end)
			return false;
		nanosleep(&(struct timespec){.tv_nsec = 10 * 1000 * 1000}, NULL);
	}
}

static void set_addr(struct sockaddr *sa, in_addr_t addr)
{
	struct sockaddr_in *in = (struct sockaddr_in *)sa;
	memset(in, 0, sizeof *in);
	in->sin_family = AF_INET;
	in->sin_addr.s_addr = addr;
}

static bool configure(const char *ifname, in_addr_t addr, in_addr_t mask, in_addr_t gateway)
{
	int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	if (s < 0)
		return false;
	struct ifreq ifr = {0};
	snprintf(ifr.ifr_name, sizeof ifr.ifr_name, "%s", ifname);
	bool ok = true;
	set_addr(&ifr.ifr_addr, addr);
	ok = ok && ioctl(s, SIOCSIFADDR, &ifr) == 0;
	set_addr(&ifr.ifr_netmask, mask);
	ok = ok && ioctl(s, SIOCSIFNETMASK, &ifr) == 0;
	ok = ok && ioctl(s, SIOCGIFFLAGS, &ifr) == 0;
	ifr.ifr_flags |= IFF_UP | IFF_RUNNING;
	ok = ok && ioctl(s, SIOCSIFFLAGS, &ifr) == 0;
	struct rtentry rt = {0};
	set_addr(&rt.rt_dst, 0);
	set_addr(&rt.rt_genmask, 0);
	set_addr(&rt.rt_gateway, gateway);
	rt.rt_flags = RTF_UP | RTF_GATEWAY;
	rt.rt_dev = (char *)ifname;
	ok = ok && (ioctl(s, SIOCADDRT, &rt) == 0 || errno == EEXIST);
	if (!ok)
		log_msg("network: configuring %s: %s", ifname, strerror(errno));
	close(s);
	return ok;
}

static void write_resolv_conf(const char *dns)
{
	int fd = open("/etc/resolv.conf", O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
	if (fd < 0) {
		log_msg("network: /etc/resolv.conf: %s", strerror(errno));
		return;
	}
	char line[64];
	int n = snprintf(line, sizeof line, "nameserver %s\n", dns);
	if (write(fd, line, (size_t)n) != n)
		log_msg("network: writing /etc/resolv.conf failed");
	close(fd);
}

/* clade.net= from the kernel command line, or false when the sandbox has no network. */
static bool net_spec(char *out, size_t outlen)
{
	char buf[8192];
	int fd = open("/proc/cmdline", O_RDONLY | O_CLOEXEC);
	ssize_t n = fd < 0 ? -1 : read(fd, buf, sizeof buf - 1);
	if (fd >= 0)
		close(fd);
	buf[n > 0 ? n : 0] = '\0';
	for (char *save = NULL, *w = strtok_r(buf, " \t\n", &save); w; w = strtok_r(NULL, " \t\n", &save)) {
		if (strncmp(w, "clade.net=", 10) == 0 && strlen(w + 10) < outlen) {
			strcpy(out, w + 10);
			return true;
		}
	}
	return false;
}

void net_boot(void)
{
	char spec[96], buf[96], *save = NULL;
	if (!net_spec(spec, sizeof spec))
		return;
	strcpy(buf, spec);
	char *cidr = strtok_r(buf, ",", &save), *gw = strtok_r(NULL, ",", &save), *dns = strtok_r(NULL, ",", &save);
	char *slash = cidr ? strchr(cidr, '/') : NULL;
	struct in_addr addr, gateway, resolver;
	if (!slash || !gw || !dns)
		goto bad;
	*slash = '\0';
	int prefix = atoi(slash + 1);
	if (prefix < 1 || prefix > 30 || inet_pton(AF_INET, cidr, &addr) != 1 || inet_pton(AF_INET, gw, &gateway) != 1 ||
	    inet_pton(AF_INET, dns, &resolver) != 1)
		goto bad;
	load_net_modules();
	char ifname[IF_NAMESIZE];
	if (!find_interface(ifname)) {
		log_msg("network: no network interface appeared");
		return;
	}
	if (configure(ifname, addr.s_addr, htonl(~0u << (32 - prefix)), gateway.s_addr)) {
		write_resolv_conf(dns);
		net_on = true;
	}
	return;
bad:
	log_msg("network: clade.net=%s is not ADDR/PREFIX,GATEWAY,DNS", spec);
}

static bool loopback4(const uint32_t *a)
{
	return (ntohl(a[0]) >> 24) == 127;
}

static bool loopback(int family, const uint32_t *a)
{
	if (family == AF_INET)
		return loopback4(a);
	/* ::1, and IPv4 loopback mapped into IPv6 (::ffff:127.x.y.z) */
	if (a[0] == 0 && a[1] == 0 && a[2] == 0 && a[3] == htonl(1))
		return true;
	return a[0] == 0 && a[1] == 0 && a[2] == htonl(0xffff) && loopback4(&a[3]);
}

/* Sends one request on the sock_diag socket and reads until its answer ends; destroy requests are answered with an ack. */
static int diag_request(int s, uint16_t type, uint16_t flags, const struct inet_diag_req_v2 *req,
			void (*each)(int s, const struct inet_diag_msg *m, int *count), int *count)
{
	struct {
		struct nlmsghdr nh;
		struct inet_diag_req_v2 r;
	} msg = {.nh = {.nlmsg_len = sizeof msg, .nlmsg_type = type, .nlmsg_flags = (uint16_t)(NLM_F_REQUEST | flags)}, .r = *req};
	if (send(s, &msg, sizeof msg, 0) < 0)
		return -errno;
	static uint8_t buf[32768];
	for (;;) {
		ssize_t n = recv(s, buf, sizeof buf, 0);
		if (n < 0)
			return -errno;
		for (struct nlmsghdr *h = (struct nlmsghdr *)buf; NLMSG_OK(h, (size_t)n); h = NLMSG_NEXT(h, n)) {
			if (h->nlmsg_type == NLMSG_DONE)
				return 0;
			if (h->nlmsg_type == NLMSG_ERROR) {
				const struct nlmsgerr *e = NLMSG_DATA(h);
				return e->error;
			}
			if (each && h->nlmsg_len >= NLMSG_LENGTH(sizeof(struct inet_diag_msg)))
				each(s, NLMSG_DATA(h), count);
		}
	}
}

static struct inet_diag_sockid doomed[512];
static int ndoomed;

static void note_socket(int s, const struct inet_diag_msg *m, int *count)
{
	(void)s;
	(void)count;
	if (loopback(m->idiag_family, m->id.idiag_src) || loopback(m->idiag_family, m->id.idiag_dst))
		return;
	if (ndoomed < (int)(sizeof doomed / sizeof doomed[0]))
		doomed[ndoomed++] = m->id;
}

/* Every TCP connection (not listener) that is not on loopback, in both families. */
static int reset_family(int s, uint8_t family)
{
	int reset = 0;
	for (int round = 0; round < 8; round++) {
		ndoomed = 0;
		struct inet_diag_req_v2 req = {.sdiag_family = family, .sdiag_protocol = IPPROTO_TCP,
					       /* all but LISTEN, TIME_WAIT and CLOSE */
					       .idiag_states = ~((1u << 10) | (1u << 6) | (1u << 7))};
		int err = diag_request(s, SOCK_DIAG_BY_FAMILY, NLM_F_DUMP, &req, note_socket, NULL);
		if (err < 0)
			return err;
		if (ndoomed == 0)
			break;
		for (int i = 0; i < ndoomed; i++) {
			struct inet_diag_req_v2 one = {.sdiag_family = family, .sdiag_protocol = IPPROTO_TCP, .idiag_states = ~0u, .id = doomed[i]};
			if (diag_request(s, SOCK_DESTROY, NLM_F_ACK, &one, NULL, NULL) == 0)
				reset++;
		}
	}
	return reset;
}

void net_reset_connections(void)
{
	if (!net_on)
		return;
	int s = socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_SOCK_DIAG);
	if (s < 0) {
		log_msg("network: sock_diag: %s", strerror(errno));
		return;
	}
	int v4 = reset_family(s, AF_INET), v6 = reset_family(s, AF_INET6);
	if (v4 < 0 || v6 < 0)
		log_msg("network: resetting the parent's connections failed: %s", strerror(-(v4 < 0 ? v4 : v6)));
	else if (v4 + v6)
		log_msg("network: reset %d connection(s) inherited from the parent", v4 + v6);
	close(s);
}
