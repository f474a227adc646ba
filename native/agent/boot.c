/* boot.c: duties of PID 1 (mounts, loopback, kernel command line, the port, power-off). */
#include "agent.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/random.h>
#include <net/if.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define PORT_NAME "org.clade.agent"
#define PORT_WAIT_MS 10000 /* the virtio port can appear after init starts */

void __attribute__((noreturn)) boot_power_off(void)
{
	log_msg("powering off");
	sync();
	reboot(RB_POWER_OFF);
	log_msg("power-off failed: %s", strerror(errno));
	for (;;) /* init must never exit */
		pause();
}

/* Keeps fds 0-2 taken, so pipes never land there and confuse the dup2s of a child. */
void boot_fill_std_fds(void)
{
	int fd;
	while ((fd = open("/dev/null", O_RDWR)) >= 0 && fd <= 2)
		;
	if (fd > 2)
		close(fd);
}

static void mount_one(const char *src, const char *target, const char *type, unsigned long flags,
		      const char *opts)
{
	mkdir(target, 0755);
	if (mount(src, target, type, flags, opts) < 0 && errno != EBUSY)
		log_msg("mount %s on %s: %s", type, target, strerror(errno));
}

/* Links that udev would normally make; shells use /dev/fd for process substitution. */
static void dev_links(void)
{
	static const char *const links[][2] = {
		{"/proc/self/fd", "/dev/fd"},
		{"/proc/self/fd/0", "/dev/stdin"},
		{"/proc/self/fd/1", "/dev/stdout"},
		{"/proc/self/fd/2", "/dev/stderr"},
	};
	for (size_t i = 0; i < sizeof links / sizeof links[0]; i++)
		if (symlink(links[i][0], links[i][1]) < 0 && errno != EEXIST)
			log_msg("symlink %s: %s", links[i][1], strerror(errno));
}

static void loopback_up(void)
{
	struct ifreq ifr = {0};
	strcpy(ifr.ifr_name, "lo");
	int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	if (s < 0 || ioctl(s, SIOCGIFFLAGS, &ifr) < 0) {
		log_msg("loopback: %s", strerror(errno));
	} else {
		ifr.ifr_flags |= IFF_UP | IFF_RUNNING;
		if (ioctl(s, SIOCSIFFLAGS, &ifr) < 0)
			log_msg("loopback up: %s", strerror(errno));
	}
	if (s >= 0)
		close(s);
}

bool parse_token_hex(const char *hex, uint8_t out[TOKEN_LEN])
{
	if (strlen(hex) != 2 * TOKEN_LEN)
		return false;
	for (size_t i = 0; i < 2 * TOKEN_LEN; i++) {
		char c = hex[i];
		int v = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
		if (v < 0)
			return false;
		out[i / 2] = (uint8_t)(i % 2 ? out[i / 2] | v : v << 4);
	}
	return true;
}

/* clade.token=, clade.id= and clade.hostname= from /proc/cmdline. Never logs the token. */
static void read_cmdline(void)
{
	char buf[8192];
	int fd = open("/proc/cmdline", O_RDONLY | O_CLOEXEC);
	ssize_t n = fd < 0 ? -1 : read(fd, buf, sizeof buf - 1);
	if (fd >= 0)
		close(fd);
	buf[n > 0 ? n : 0] = '\0';
	bool have_token = false;
	for (char *save = NULL, *w = strtok_r(buf, " \t\n", &save); w; w = strtok_r(NULL, " \t\n", &save)) {
		if (strncmp(w, "clade.token=", 12) == 0)
			have_token = parse_token_hex(w + 12, g.token);
		else if (strncmp(w, "clade.id=", 9) == 0 && strlen(w + 9) <= SANDBOX_ID_MAX)
			strcpy(g.sandbox_id, w + 9);
		else if (strncmp(w, "clade.hostname=", 15) == 0 && sethostname(w + 15, strlen(w + 15)) < 0)
			log_msg("sethostname: %s", strerror(errno));
	}
	if (!have_token) {
		log_msg("no valid clade.token= (64 hex digits) on the kernel command line");
		boot_power_off();
	}
}

void boot_pid1(void)
{
	/* /dev first: it holds /dev/null for fds 0-2 and /dev/console for the log. */
	mount_one("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755");
	boot_fill_std_fds();
	int con = open("/dev/console", O_WRONLY | O_NOCTTY | O_CLOEXEC);
	if (con >= 0)
		g.log_fd = con;
	mount_one("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
	boot_load_modules();
	boot_switch_root(); /* a disk image's root: what follows is mounted there */
	mount_one("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
	mount_one("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, "gid=5,mode=0620,ptmxmode=0666");
	mount_one("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777");
	mount_one("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777");
	mount_one("tmpfs", "/run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755");
	dev_links();
	mkdir("/root", 0700);
	loopback_up();
	read_cmdline();
}

static bool port_named(const char *dir)
{
	char path[512], name[64] = {0};
	snprintf(path, sizeof path, "/sys/class/virtio-ports/%s/name", dir);
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return false;
	ssize_t n = read(fd, name, sizeof name - 1);
	close(fd);
	return n > 0 && strcmp(name, PORT_NAME "\n") == 0;
}

static int try_open_port(void)
{
	DIR *d = opendir("/sys/class/virtio-ports");
	if (!d)
		return -1;
	int fd = -1;
	struct dirent *ent;
	while (fd < 0 && (ent = readdir(d))) {
		if (ent->d_name[0] == '.' || !port_named(ent->d_name))
			continue;
		char dev[300];
		snprintf(dev, sizeof dev, "/dev/%s", ent->d_name);
		fd = open(dev, O_RDWR | O_NONBLOCK | O_NOCTTY | O_CLOEXEC);
		if (fd >= 0)
			log_msg("host channel is %s", dev);
	}
	closedir(d);
	return fd;
}

int boot_open_port(void)
{
	int64_t end = now_ms() + PORT_WAIT_MS;
	for (;;) {
		int fd = try_open_port();
		if (fd >= 0)
			return fd;
		if (now_ms() > end) {
			log_msg("no virtio port named " PORT_NAME);
			boot_power_off();
		}
		nanosleep(&(struct timespec){.tv_nsec = 20 * 1000 * 1000}, NULL);
	}
}

/* Credits host entropy so a forked VM does not share its RNG state with its siblings. */
void boot_credit_entropy(const uint8_t *seed, size_t len)
{
	int fd = open("/dev/urandom", O_WRONLY | O_CLOEXEC);
	if (fd < 0) {
		log_msg("open /dev/urandom: %s", strerror(errno));
		return;
	}
	struct rand_pool_info *info = malloc(sizeof *info + len);
	if (info) {
		info->entropy_count = (int)(len * 8);
		info->buf_size = (int)len;
		memcpy(info->buf, seed, len);
	}
	if (!info || ioctl(fd, RNDADDENTROPY, info) < 0) {
		/* Still mixed in, just not credited. */
		ssize_t w = write(fd, seed, len);
		if (w != (ssize_t)len)
			log_msg("seeding /dev/urandom failed");
	}
	/*
	 * Mixing in entropy only feeds the input pool; the kernel's CRNG, which
	 * every sibling inherited in the same state, is reseeded from it only
	 * later. Force the reseed now, before any process reads random bytes.
	 */
	if (ioctl(fd, RNDRESEEDCRNG, 0) < 0)
		log_msg("RNDRESEEDCRNG: %s", strerror(errno));
	free(info);
	close(fd);
}
