/*
 * Helpers every layer of clade-vmm shares: the monotonic clock, whole-buffer
 * reads and writes, listening unix sockets, number parsing, and the bounded
 * text buffer replies are built in.
 */
#include "vmm.h"

#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

int read_exact(int fd, void *buf, size_t len, off_t off) {
    uint8_t *p = buf;
    while (len) {
        ssize_t n = pread(fd, p, len, off);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) return -1;
        p += n, len -= (size_t)n, off += n;
    }
    return 0;
}

int write_all_at(int fd, const void *buf, size_t len, off_t at) {
    const uint8_t *p = buf;
    while (len) {
        ssize_t n = pwrite(fd, p, len, at);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) return -1;
        p += n, len -= (size_t)n, at += n;
    }
    return 0;
}

int unix_listen(const char *path, int *fd_out) {
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    if (strlen(path) >= sizeof addr.sun_path) return errno = ENAMETOOLONG, -1;
    strcpy(addr.sun_path, path);
    /* Non-blocking: a client that gave up between poll and accept must not leave the caller in accept. */
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

int unix_connect(const char *path) {
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    if (strlen(path) >= sizeof addr.sun_path) return errno = ENAMETOOLONG, -1;
    strcpy(addr.sun_path, path);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return -1;
    if (connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0 || fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK) < 0) {
        int saved = errno;
        close(fd);
        return errno = saved, -1;
    }
    return fd;
}

int parse_u64(const char *s, uint64_t *out) {
    if (!s || !*s || *s == '-') return -1;
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 0);
    if (errno || *end) return -1;
    *out = v;
    return 0;
}

/* ---- text buffer ------------------------------------------------------------ */

void tb_init(struct text_buf *t, char *storage, size_t cap) {
    *t = (struct text_buf){.data = storage, .cap = cap};
    if (cap) storage[0] = '\0';
}

void tb_reset(struct text_buf *t) {
    t->len = 0;
    t->overflow = false;
    if (t->cap) t->data[0] = '\0';
}

/* One byte of the buffer always stays free (for the terminating NUL, or the caller's line end instead). */
void tb_printf(struct text_buf *t, const char *fmt, ...) {
    if (t->overflow || t->cap < 2) return (void)(t->overflow = true);
    size_t room = t->cap - 1 - t->len;
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(t->data + t->len, room + 1, fmt, ap);
    va_end(ap);
    if (n < 0 || (size_t)n > room) {
        t->data[t->len] = '\0';
        t->overflow = true;
        return;
    }
    t->len += (size_t)n;
}

/* A JSON string: paths and messages may hold quotes, backslashes or control bytes. */
void tb_json_string(struct text_buf *t, const char *s) {
    tb_printf(t, "\"");
    for (; *s && !t->overflow; s++) {
        unsigned char ch = (unsigned char)*s;
        if (ch == '"' || ch == '\\') tb_printf(t, "\\%c", ch);
        else if (ch < 0x20) tb_printf(t, "\\u%04x", ch);
        else tb_printf(t, "%c", ch);
    }
    tb_printf(t, "\"");
}
