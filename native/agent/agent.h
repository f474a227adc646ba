/* clade guest agent: shared definitions. docs/protocol.md is the specification. */
#ifndef CLADE_AGENT_H
#define CLADE_AGENT_H

#include <limits.h>
#include <poll.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "protocol.h"

#define AGENT_VERSION "0.1.0"

#define TRUNCATED_MS 2000 /* a partial frame with no progress for this long is dropped */
#define SYNC_LEN (HDR_LEN + TOKEN_LEN) /* a host frame's header and token: where it can be recognized */

#define MAX_EXECS 64
#define MAX_WRITES 16
#define MAX_ARGV 4096
#define MAX_ENV 4096
#define OUT_CHUNK (64 * 1024)   /* largest STDOUT/STDERR frame */
#define FILE_CHUNK (256 * 1024) /* largest FILE_DATA frame */
#define SANDBOX_ID_MAX 255

/* A decoded host request. Strings point into the frame buffer, NUL-terminated in place. */
struct req {
	uint8_t type;
	uint32_t id;
	const uint8_t *raw; /* body after the token (raw-byte messages) */
	size_t raw_len;
	bool has[F_TAG_MAX + 1];
	const uint8_t *val[F_TAG_MAX + 1];
	uint32_t len[F_TAG_MAX + 1];
	uint64_t num[F_TAG_MAX + 1]; /* decoded u64 fields */
	size_t argc, envc;
	const char *argv[MAX_ARGV + 1];
	const char *env[MAX_ENV + 1];
};

#define REQ_STR(r, tag) ((const char *)(r)->val[tag])

/* Process-wide state. */
struct agent {
	bool pid1;        /* real guest init (else development mode on a given fd) */
	int port_fd;      /* the byte stream to the host */
	bool connected;   /* false while the host end is closed */
	int sig_fd;       /* signalfd for SIGCHLD (and SIGTERM/SIGINT in development mode) */
	int log_fd;       /* /dev/console as init, else stderr */
	uint8_t token[TOKEN_LEN];
	char sandbox_id[SANDBOX_ID_MAX + 1];
	char default_cwd[PATH_MAX];
	uint32_t newest_id;        /* newest authenticated request id (serial order) */
	uint32_t newest_before;    /* newest_id as it was before the request being handled */
	bool seen_any;
};
extern struct agent g;

/* Outgoing field list, built in the shared output buffer. */
struct body {
	uint8_t *p;
	size_t len;
};

/* rootfs.c */
void boot_load_modules(void);
void boot_switch_root(void);

/* main.c */
void log_msg(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
int64_t now_ms(void);

/* wire.c */
#define PARSER_READ_MAX (64 * 1024) /* the most parser_feed is given at once */
void parser_feed(const uint8_t *p, size_t n);
void parser_resume(void);
int64_t parser_deadline(void);
void parser_check_timeout(int64_t now);
void parser_reset(void);
void dispatch_frame(uint8_t type, uint32_t id, uint8_t *payload, size_t len); /* in main.c */
bool req_parse(struct req *r, uint8_t *p, size_t n, char *why, size_t whylen);
uint8_t *out_buffer(void); /* FRAME_MAX bytes for a body being built */
void body_start(struct body *b);
bool body_fits(const struct body *b, size_t value_len);
void body_put(struct body *b, uint16_t tag, const void *v, size_t n);
void body_u64(struct body *b, uint16_t tag, uint64_t v);
void body_str(struct body *b, uint16_t tag, const char *s);
size_t body_open(struct body *b, uint16_t tag);
void body_close(struct body *b, size_t at);
void send_frame(uint8_t type, uint32_t id, const void *body, size_t len);
void send_body(uint8_t type, uint32_t id, const struct body *b);
void send_ok_empty(uint32_t id);
void send_error(uint32_t id, const char *code, int err, const char *fmt, ...)
	__attribute__((format(printf, 4, 5)));
void send_errno(uint32_t id, int err, const char *what, const char *path);
const char *errno_code(int err);

/* sync.c */
size_t sync_scan(const uint8_t *p, size_t n, bool *found);
bool sync_token_current(void);
void sync_reset(void);
uint64_t sync_pos(void);
void sync_rewind(uint64_t to);
void sync_recent(uint64_t from, size_t len, uint8_t *out);

/* exec.c */
void exec_start(const struct req *r);
void exec_stdin(const struct req *r);
void exec_signal(const struct req *r);
size_t exec_pollfds(struct pollfd *pfd, size_t max);
void exec_handle_poll(const struct pollfd *pfd, size_t n);
bool exec_reap(void);
int64_t exec_deadline(void);
void exec_check_timeouts(int64_t now);
void exec_kill_all(int sig);

/* files.c */
bool path_resolve(const char *in, char out[PATH_MAX]);
void file_read(const struct req *r);
void file_write_open(const struct req *r);
void file_write_data(const struct req *r);
void file_write_close(const struct req *r);
void file_list(const struct req *r);
void file_stat(const struct req *r);
void file_mkdir(const struct req *r);
void file_remove(const struct req *r);
void files_abort_writes(void);
void files_abort_write(uint32_t id);

/* boot.c */
void boot_pid1(void);
void boot_fill_std_fds(void);
int boot_open_port(void);
void boot_credit_entropy(const uint8_t *seed, size_t len);

/* net.c */
void net_boot(void);
void net_reset_connections(void);
void boot_power_off(void) __attribute__((noreturn));
bool parse_token_hex(const char *hex, uint8_t out[TOKEN_LEN]);

#endif
