/*
 * rootfs.c: kernel modules from the initramfs, and the root filesystem of a
 * disk image: a read-only disk (clade.root=, clade.rootfstype=) under a
 * tmpfs overlay, switched to before anything else runs.
 *
 * Small images are one initramfs and need none of this. A big one would cost
 * its whole size in RAM in every VM, so it is a read-only erofs disk that all
 * forks share; each VM's writes land in its own tmpfs (guest RAM, copied on
 * write by a fork like the rest of it).
 */
#include "agent.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define MODULES_DIR "/usr/lib/clade/modules"
#define MAX_MODULES 64
#define DISK_WAIT_MS 10000
#define NEW_ROOT "/.clade-root"

static int by_name(const void *a, const void *b)
{
	return strcmp(*(const char *const *)a, *(const char *const *)b);
}

/* Loads every *.ko the image put in MODULES_DIR, in file-name order (the image numbers them). */
void boot_load_modules(void)
{
	DIR *d = opendir(MODULES_DIR);
	if (!d)
		return;
	char *names[MAX_MODULES];
	size_t n = 0;
	struct dirent *ent;
	while ((ent = readdir(d)) && n < MAX_MODULES) {
		size_t len = strlen(ent->d_name);
		if (len > 3 && strcmp(ent->d_name + len - 3, ".ko") == 0 && (names[n] = strdup(ent->d_name)))
			n++;
	}
	closedir(d);
	qsort(names, n, sizeof names[0], by_name);
	for (size_t i = 0; i < n; i++) {
		char path[512];
		snprintf(path, sizeof path, MODULES_DIR "/%s", names[i]);
		int fd = open(path, O_RDONLY | O_CLOEXEC);
		if (fd < 0 || syscall(SYS_finit_module, fd, "", 0) < 0) {
			if (errno != EEXIST)
				log_msg("module %s: %s", names[i], strerror(errno));
		}
		if (fd >= 0)
			close(fd);
		free(names[i]);
	}
}

/* The value of `key` (e.g. "clade.root=") on the kernel command line, or false. */
static bool cmdline_value(const char *key, char *out, size_t outlen)
{
	char buf[8192];
	int fd = open("/proc/cmdline", O_RDONLY | O_CLOEXEC);
	ssize_t n = fd < 0 ? -1 : read(fd, buf, sizeof buf - 1);
	if (fd >= 0)
		close(fd);
	buf[n > 0 ? n : 0] = '\0';
	size_t klen = strlen(key);
	for (char *save = NULL, *w = strtok_r(buf, " \t\n", &save); w; w = strtok_r(NULL, " \t\n", &save)) {
		if (strncmp(w, key, klen) == 0 && strlen(w + klen) < outlen) {
			strcpy(out, w + klen);
			return true;
		}
	}
	return false;
}

static void __attribute__((noreturn)) root_failed(const char *what, const char *arg)
{
	log_msg("cannot set up the root filesystem: %s %s: %s", what, arg, strerror(errno));
	boot_power_off();
}

/* The disk's node appears when virtio-blk has probed it, which can trail the module's load. */
static void wait_for_device(const char *dev)
{
	int64_t end = now_ms() + DISK_WAIT_MS;
	struct stat st;
	while (stat(dev, &st) < 0 || !S_ISBLK(st.st_mode)) {
		if (now_ms() > end) {
			errno = ENODEV;
			root_failed("no disk at", dev);
		}
		nanosleep(&(struct timespec){.tv_nsec = 10 * 1000 * 1000}, NULL);
	}
}

static void make_dir(const char *path)
{
	if (mkdir(path, 0755) < 0 && errno != EEXIST)
		root_failed("mkdir", path);
}

/*
 * With clade.root=DEV on the command line: mounts DEV read-only (type from
 * clade.rootfstype=, erofs by default), a tmpfs for the writes, the overlay of
 * the two, moves /dev and /proc into it and makes it the root. Expects /dev
 * and /proc mounted; everything else is mounted afterwards, in the new root.
 * Without clade.root= it does nothing: the initramfs is the root.
 */
void boot_switch_root(void)
{
	char dev[128], fstype[32] = "erofs";
	if (!cmdline_value("clade.root=", dev, sizeof dev))
		return;
	cmdline_value("clade.rootfstype=", fstype, sizeof fstype);
	wait_for_device(dev);
	make_dir(NEW_ROOT);
	make_dir(NEW_ROOT "/lower");
	make_dir(NEW_ROOT "/rw");
	make_dir(NEW_ROOT "/root");
	if (mount(dev, NEW_ROOT "/lower", fstype, MS_RDONLY | MS_NODEV, NULL) < 0)
		root_failed("mount", dev);
	if (mount("tmpfs", NEW_ROOT "/rw", "tmpfs", MS_NODEV, "mode=0755") < 0)
		root_failed("mount tmpfs on", NEW_ROOT "/rw");
	make_dir(NEW_ROOT "/rw/upper");
	make_dir(NEW_ROOT "/rw/work");
	if (mount("overlay", NEW_ROOT "/root", "overlay", 0,
		  "lowerdir=" NEW_ROOT "/lower,upperdir=" NEW_ROOT "/rw/upper,workdir=" NEW_ROOT "/rw/work") < 0)
		root_failed("mount overlay on", NEW_ROOT "/root");
	static const char *const carried[] = {"/dev", "/proc"};
	for (size_t i = 0; i < sizeof carried / sizeof carried[0]; i++) {
		char target[64];
		snprintf(target, sizeof target, NEW_ROOT "/root%s", carried[i]);
		mkdir(target, 0755); /* the image has it; an overlay directory made here stays in RAM */
		if (mount(carried[i], target, NULL, MS_MOVE, NULL) < 0)
			root_failed("move", carried[i]);
	}
	if (chdir(NEW_ROOT "/root") < 0)
		root_failed("chdir", NEW_ROOT "/root");
	if (mount(".", "/", NULL, MS_MOVE, NULL) < 0)
		root_failed("move the new root onto", "/");
	if (chroot(".") < 0 || chdir("/") < 0)
		root_failed("chroot", NEW_ROOT "/root");
	log_msg("root is %s (%s, read-only) under a tmpfs overlay", dev, fstype);
}
