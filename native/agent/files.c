/* files.c: paths and the file requests (READ_FILE, WRITE_*, LIST, STAT, MKDIR, REMOVE). */
#include "agent.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define RM_MAX_DEPTH 512 /* each level holds an open directory and a stack frame */
#define ERR_TOO_DEEP (-1)
#define TMP_BASE_MAX 200 /* keeps the temporary name under NAME_MAX */

/* ---- paths ---- */

/* Lexical normalisation: drops empty and "." components and resolves "..". */
static bool normalise(const char *p, char out[PATH_MAX])
{
	size_t o = 0;
	while (*p) {
		while (*p == '/')
			p++;
		const char *s = p;
		while (*p && *p != '/')
			p++;
		size_t len = (size_t)(p - s);
		if (len == 0 || (len == 1 && s[0] == '.'))
			continue;
		if (len == 2 && s[0] == '.' && s[1] == '.') {
			while (o > 0 && out[o - 1] != '/')
				o--;
			if (o > 0)
				o--;
			continue;
		}
		if (o + 1 + len >= PATH_MAX)
			return false;
		out[o++] = '/';
		memcpy(out + o, s, len);
		o += len;
	}
	if (o == 0)
		out[o++] = '/';
	out[o] = '\0';
	return true;
}

bool path_resolve(const char *in, char out[PATH_MAX])
{
	size_t n = strlen(in);
	if (n == 0 || n > PATH_MAX - 1)
		return false;
	char joined[PATH_MAX + sizeof "/root/"];
	snprintf(joined, sizeof joined, "%s%s", in[0] == '/' ? "" : "/root/", in);
	return normalise(joined, out);
}

/* Checked after normalisation, so "/tmp/../proc" is caught too. */
static bool path_protected(const char *p)
{
	static const char *const dirs[] = {"/proc", "/sys", "/dev"};
	for (size_t i = 0; i < sizeof dirs / sizeof dirs[0]; i++) {
		size_t n = strlen(dirs[i]);
		if (strncmp(p, dirs[i], n) == 0 && (p[n] == '\0' || p[n] == '/'))
			return true;
	}
	return strcmp(p, "/init") == 0;
}

static bool req_path(const struct req *r, char path[PATH_MAX])
{
	if (!r->has[F_PATH]) {
		send_error(r->id, "bad_request", 0, "PATH is required");
		return false;
	}
	if (!path_resolve(REQ_STR(r, F_PATH), path)) {
		send_error(r->id, "bad_request", 0, "PATH must be non-empty and at most 4095 bytes");
		return false;
	}
	return true;
}

static bool req_path_writable(const struct req *r, char path[PATH_MAX])
{
	if (!req_path(r, path))
		return false;
	if (path_protected(path)) {
		send_error(r->id, "permission", EACCES, "%s is protected", path);
		return false;
	}
	return true;
}

static const char *base_name(const char *path)
{
	const char *s = strrchr(path, '/');
	return s[1] ? s + 1 : path; /* "/" names itself */
}

/* Creates path and its missing parents (parents 0755); returns 0 or an errno. */
static int mkdir_p(const char *path, mode_t mode, bool *created)
{
	char buf[PATH_MAX];
	strcpy(buf, path);
	*created = false;
	for (char *p = buf + 1; *p;) {
		char *end = strchr(p, '/');
		if (end)
			*end = '\0';
		struct stat st;
		if (mkdir(buf, end ? 0755 : mode) == 0)
			*created = !end;
		else if (errno != EEXIST || stat(buf, &st) < 0)
			return errno;
		else if (!S_ISDIR(st.st_mode))
			return end ? ENOTDIR : EEXIST;
		if (!end)
			break;
		*end = '/';
		p = end + 1;
	}
	return 0;
}

/* ---- READ_FILE ---- */

static void stream_file(uint32_t id, int fd, const char *path, mode_t mode, uint64_t limit)
{
	uint8_t *buf = out_buffer();
	uint64_t total = 0;
	for (;;) {
		if (total > limit) { /* the file grew while it was read */
			send_error(id, "too_large", EFBIG, "%s grew past the %llu-byte read limit", path,
				   (unsigned long long)limit);
			return;
		}
		ssize_t n = read(fd, buf, FILE_CHUNK);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0) {
			send_errno(id, errno, "cannot read", path);
			return;
		}
		if (n == 0)
			break;
		send_frame(T_FILE_DATA, id, buf, (size_t)n);
		total += (uint64_t)n;
		if (!g.connected)
			return;
	}
	struct body b;
	body_start(&b);
	body_u64(&b, F_SIZE, total);
	body_u64(&b, F_MODE, mode & 07777);
	send_body(T_OK, id, &b);
}

/* Only regular files: a device or FIFO could stream forever or block the agent. */
void file_read(const struct req *r)
{
	char path[PATH_MAX];
	if (!req_path(r, path))
		return;
	int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
	struct stat st;
	if (fd < 0 || fstat(fd, &st) < 0)
		send_errno(r->id, errno, "cannot open", path);
	else if (S_ISDIR(st.st_mode))
		send_error(r->id, "is_dir", EISDIR, "%s is a directory", path);
	else if (!S_ISREG(st.st_mode))
		send_error(r->id, "io", 0, "%s is not a regular file", path);
	else if (r->has[F_LIMIT] && (uint64_t)st.st_size > r->num[F_LIMIT])
		send_error(r->id, "too_large", EFBIG, "%s has %lld bytes, over the %llu-byte read limit", path,
			   (long long)st.st_size, (unsigned long long)r->num[F_LIMIT]);
	else
		stream_file(r->id, fd, path, st.st_mode, r->has[F_LIMIT] ? r->num[F_LIMIT] : UINT64_MAX);
	if (fd >= 0)
		close(fd);
}

/* ---- WRITE_OPEN / WRITE_DATA / WRITE_CLOSE ---- */

struct wfile {
	bool used;
	uint32_t id;
	int fd;
	int err; /* first write error, reported at WRITE_CLOSE */
	uint64_t size;
	char path[PATH_MAX];
	char tmp[PATH_MAX];
};

static struct wfile writes[MAX_WRITES];

static struct wfile *find_write(uint32_t id)
{
	for (size_t i = 0; i < MAX_WRITES; i++)
		if (writes[i].used && writes[i].id == id)
			return &writes[i];
	return NULL;
}

static struct wfile *free_write(void)
{
	for (size_t i = 0; i < MAX_WRITES; i++)
		if (!writes[i].used)
			return &writes[i];
	return NULL;
}

/* Creates the parents and the temporary file next to path; returns 0 or an errno. */
static int open_temp(struct wfile *w, const char *path, mode_t mode)
{
	size_t dirlen = (size_t)(strrchr(path, '/') - path);
	char dir[PATH_MAX];
	bool created;
	snprintf(dir, sizeof dir, "%.*s", (int)dirlen, path);
	int err = dirlen > 0 ? mkdir_p(dir, 0755, &created) : 0;
	if (err)
		return err;
	int n = snprintf(w->tmp, sizeof w->tmp, "%s/.%.*s.clade-tmp-%u", dir, TMP_BASE_MAX, path + dirlen + 1,
			 w->id);
	if (n < 0 || (size_t)n >= sizeof w->tmp)
		return ENAMETOOLONG;
	int flags = O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC;
	w->fd = open(w->tmp, flags, mode);
	if (w->fd < 0 && errno == EEXIST && unlink(w->tmp) == 0) /* left over from an earlier agent */
		w->fd = open(w->tmp, flags, mode);
	return w->fd < 0 ? errno : 0;
}

void file_write_open(const struct req *r)
{
	char path[PATH_MAX];
	if (!req_path_writable(r, path))
		return;
	if (find_write(r->id)) {
		send_error(r->id, "bad_request", 0, "request id %u already names an open write", r->id);
		return;
	}
	struct wfile *w = free_write();
	if (!w) {
		send_error(r->id, "busy", 0, "too many open writes (at most %d)", MAX_WRITES);
		return;
	}
	struct stat st;
	if (stat(path, &st) == 0 && S_ISDIR(st.st_mode)) {
		send_error(r->id, "is_dir", EISDIR, "%s is a directory", path);
		return;
	}
	*w = (struct wfile){.id = r->id, .fd = -1};
	strcpy(w->path, path);
	mode_t mode = r->has[F_MODE] ? (mode_t)(r->num[F_MODE] & 07777) : 0644;
	int err = open_temp(w, path, mode);
	if (err) {
		send_errno(r->id, err, "cannot create", path);
		return;
	}
	w->used = true;
	send_ok_empty(r->id);
}

/* No reply: a failure is remembered and reported by WRITE_CLOSE. */
void file_write_data(const struct req *r)
{
	struct wfile *w = find_write(r->id);
	if (!w || w->err)
		return;
	for (size_t off = 0; off < r->raw_len;) {
		ssize_t n = write(w->fd, r->raw + off, r->raw_len - off);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0) {
			w->err = errno;
			return;
		}
		off += (size_t)n;
		w->size += (uint64_t)n;
	}
}

/* No fsync: the sandbox is disposable, and a crash loses the whole VM anyway. */
void file_write_close(const struct req *r)
{
	struct wfile *w = find_write(r->id);
	if (!w) {
		send_error(r->id, "not_found", 0, "no open write with id %u", r->id);
		return;
	}
	int err = w->err;
	if (close(w->fd) < 0 && !err)
		err = errno;
	w->used = false;
	if (r->has[F_DISCARD] && r->num[F_DISCARD]) { /* the host gave up on the upload */
		unlink(w->tmp);
		send_ok_empty(r->id);
		return;
	}
	if (!err && rename(w->tmp, w->path) < 0)
		err = errno;
	if (err) {
		unlink(w->tmp);
		send_errno(r->id, err, "cannot write", w->path);
		return;
	}
	struct body b;
	body_start(&b);
	body_u64(&b, F_SIZE, w->size);
	send_body(T_OK, r->id, &b);
}

static void abort_write(struct wfile *w)
{
	close(w->fd);
	unlink(w->tmp);
	w->used = false;
}

void files_abort_writes(void)
{
	for (size_t i = 0; i < MAX_WRITES; i++)
		if (writes[i].used)
			abort_write(&writes[i]);
}

void files_abort_write(uint32_t id)
{
	struct wfile *w = find_write(id);
	if (w)
		abort_write(w);
}

/* ---- LIST / STAT ---- */

static uint64_t file_type(mode_t m)
{
	return S_ISREG(m) ? 1 : S_ISDIR(m) ? 2 : S_ISLNK(m) ? 3 : 4;
}

#define ENTRY_FIXED (6 + 4 * (6 + 8)) /* NAME header + TYPE SIZE MODE MTIME_MS */

static void put_entry(struct body *b, const char *name, const struct stat *st)
{
	int64_t mtime = (int64_t)st->st_mtim.tv_sec * 1000 + st->st_mtim.tv_nsec / 1000000;
	body_str(b, F_NAME, name);
	body_u64(b, F_TYPE, file_type(st->st_mode));
	body_u64(b, F_SIZE, (uint64_t)st->st_size);
	body_u64(b, F_MODE, st->st_mode & 07777);
	body_u64(b, F_MTIME_MS, (uint64_t)mtime);
}

void file_list(const struct req *r)
{
	char path[PATH_MAX];
	if (!req_path(r, path))
		return;
	DIR *d = opendir(path);
	if (!d) {
		send_errno(r->id, errno, "cannot list", path);
		return;
	}
	struct body b;
	body_start(&b);
	bool truncated = false;
	int err = 0;
	for (;;) {
		errno = 0;
		struct dirent *ent = readdir(d);
		if (!ent) {
			err = errno;
			break;
		}
		const char *name = ent->d_name;
		struct stat st;
		if (strcmp(name, ".") == 0 || strcmp(name, "..") == 0 ||
		    fstatat(dirfd(d), name, &st, AT_SYMLINK_NOFOLLOW) < 0) /* vanished meanwhile */
			continue;
		/* Leave room for TRUNCATED (6 + 8) after the entry. */
		if (!body_fits(&b, ENTRY_FIXED + strlen(name) + 14)) {
			truncated = true;
			break;
		}
		size_t at = body_open(&b, F_ENTRY);
		put_entry(&b, name, &st);
		body_close(&b, at);
	}
	closedir(d);
	if (err) {
		send_errno(r->id, err, "cannot list", path);
		return;
	}
	body_u64(&b, F_TRUNCATED, truncated);
	send_body(T_OK, r->id, &b);
}

void file_stat(const struct req *r)
{
	char path[PATH_MAX];
	struct stat st;
	if (!req_path(r, path))
		return;
	if (lstat(path, &st) < 0) {
		send_errno(r->id, errno, "cannot stat", path);
		return;
	}
	struct body b;
	body_start(&b);
	put_entry(&b, base_name(path), &st);
	send_body(T_OK, r->id, &b);
}

/* ---- MKDIR / REMOVE ---- */

void file_mkdir(const struct req *r)
{
	char path[PATH_MAX];
	if (!req_path_writable(r, path))
		return;
	mode_t mode = r->has[F_MODE] ? (mode_t)(r->num[F_MODE] & 07777) : 0755;
	bool created;
	int err = mkdir_p(path, mode, &created);
	if (err) {
		send_errno(r->id, err, "cannot create directory", path);
		return;
	}
	struct body b;
	body_start(&b);
	body_u64(&b, F_CREATED, created);
	send_body(T_OK, r->id, &b);
}

/* Deletes directory name inside dirfd and everything under it, never following symlinks. */
static int remove_tree_at(int dirfd, const char *name, int depth)
{
	if (depth > RM_MAX_DEPTH)
		return ERR_TOO_DEEP;
	int fd = openat(dirfd, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
	if (fd < 0)
		return errno;
	DIR *d = fdopendir(fd);
	if (!d) {
		int err = errno;
		close(fd);
		return err;
	}
	int err = 0;
	struct dirent *ent;
	while (!err && (ent = readdir(d))) {
		const char *n = ent->d_name;
		struct stat st;
		if (strcmp(n, ".") == 0 || strcmp(n, "..") == 0)
			continue;
		if (fstatat(fd, n, &st, AT_SYMLINK_NOFOLLOW) < 0)
			err = errno == ENOENT ? 0 : errno;
		else if (S_ISDIR(st.st_mode))
			err = remove_tree_at(fd, n, depth + 1);
		else if (unlinkat(fd, n, 0) < 0 && errno != ENOENT)
			err = errno;
	}
	closedir(d);
	if (!err && unlinkat(dirfd, name, AT_REMOVEDIR) < 0)
		err = errno;
	return err;
}

static int remove_tree(const char *path)
{
	const char *name = base_name(path);
	char parent[PATH_MAX];
	snprintf(parent, sizeof parent, "%.*s", (int)(name - path), path);
	int dirfd = open(parent, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (dirfd < 0)
		return errno;
	int err = remove_tree_at(dirfd, name, 0);
	close(dirfd);
	return err;
}

void file_remove(const struct req *r)
{
	char path[PATH_MAX];
	if (!req_path_writable(r, path))
		return;
	if (strcmp(path, "/") == 0) { /* would reach into /proc, /sys and /dev */
		send_error(r->id, "permission", EACCES, "refusing to remove /");
		return;
	}
	struct stat st;
	int err = 0;
	if (lstat(path, &st) < 0)
		err = errno;
	else if (!S_ISDIR(st.st_mode))
		err = unlink(path) < 0 ? errno : 0;
	else if (r->has[F_RECURSIVE] && r->num[F_RECURSIVE] == 1)
		err = remove_tree(path);
	else
		err = rmdir(path) < 0 ? errno : 0;
	if (err == ERR_TOO_DEEP)
		send_error(r->id, "io", 0, "cannot remove %s: more than %d nested directories", path, RM_MAX_DEPTH);
	else if (err)
		send_errno(r->id, err, "cannot remove", path);
	else
		send_ok_empty(r->id);
}
