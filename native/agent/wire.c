/* wire.c: the frame stream (incoming parser, outgoing writer) and the field codec. */
#include "agent.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/uio.h>

static const uint8_t MAGIC[4] = PROTO_MAGIC; /* 4 bytes, no NUL */

static uint16_t get_le16(const uint8_t *p) { return (uint16_t)(p[0] | p[1] << 8); }

static uint32_t get_le32(const uint8_t *p)
{
	return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static uint64_t get_le64(const uint8_t *p) { return get_le32(p) | (uint64_t)get_le32(p + 4) << 32; }

static void put_le16(uint8_t *p, uint16_t v)
{
	p[0] = (uint8_t)v;
	p[1] = (uint8_t)(v >> 8);
}

static void put_le32(uint8_t *p, uint32_t v)
{
	for (int i = 0; i < 4; i++)
		p[i] = (uint8_t)(v >> (8 * i));
}

static void put_le64(uint8_t *p, uint64_t v)
{
	put_le32(p, (uint32_t)v);
	put_le32(p + 4, (uint32_t)(v >> 32));
}

/* ---- incoming frames ---- */

enum pstate { P_HEADER, P_PAYLOAD, P_DISCARD };

static struct {
	enum pstate state;
	uint8_t hdr[HDR_LEN];
	size_t hlen;
	bool resyncing; /* bad_frame already reported for the current run of garbage */
	uint8_t type;
	uint32_t id, len;
	size_t have;     /* payload bytes stored (P_PAYLOAD) or skipped (P_DISCARD) */
	int64_t last_ms; /* when the partial frame last made progress */
	uint64_t pos;    /* stream bytes consumed, counted like sync_pos() */
	uint64_t start;  /* stream position of the current frame's header (P_PAYLOAD, P_DISCARD) */
} ps;

/* +1: room for the NUL that req_parse writes after a trailing string field. */
static uint8_t payload[FRAME_MAX + 1];

/* Forgets the frame under way; the stream goes on. */
static void frame_reset(void)
{
	ps.state = P_HEADER;
	ps.hlen = 0;
	ps.resyncing = false;
}

/* A new stream: the host end was (re)opened. */
void parser_reset(void)
{
	frame_reset();
	ps.pos = 0;
	sync_reset();
}

/* Drops leading header bytes until what is left could still start a frame. */
static void resync(void)
{
	if (!ps.resyncing)
		send_error(0, "bad_frame", 0, "bad frame magic; skipping to the next frame");
	ps.resyncing = true;
	size_t s = 1;
	while (s < ps.hlen && memcmp(ps.hdr + s, MAGIC, ps.hlen - s) != 0)
		s++;
	memmove(ps.hdr, ps.hdr + s, ps.hlen - s);
	ps.hlen -= s;
}

static void header_done(void)
{
	ps.type = ps.hdr[4];
	ps.id = get_le32(ps.hdr + 8);
	ps.len = get_le32(ps.hdr + 12);
	ps.hlen = 0;
	ps.have = 0;
	ps.resyncing = false;
	ps.start = ps.pos - HDR_LEN;
	if (ps.len > FRAME_MAX) {
		send_error(ps.id, "too_large", 0, "frame length %u exceeds the 1 MiB limit", ps.len);
		ps.state = P_DISCARD;
	} else if (ps.len == 0) {
		dispatch_frame(ps.type, ps.id, payload, 0);
	} else {
		ps.state = P_PAYLOAD;
	}
}

static size_t feed_header(const uint8_t *p, size_t n)
{
	size_t i = 0;
	while (i < n && ps.hlen < HDR_LEN) {
		ps.hdr[ps.hlen++] = p[i++];
		ps.pos++;
		if (ps.hlen <= sizeof MAGIC && ps.hdr[ps.hlen - 1] != MAGIC[ps.hlen - 1])
			resync();
	}
	if (ps.hlen == HDR_LEN)
		header_done();
	return i;
}

static size_t feed_payload(const uint8_t *p, size_t n)
{
	size_t take = ps.len - ps.have;
	if (take > n)
		take = n;
	memcpy(payload + ps.have, p, take);
	ps.have += take;
	ps.pos += take;
	if (ps.have == ps.len) {
		ps.state = P_HEADER;
		dispatch_frame(ps.type, ps.id, payload, ps.len);
	}
	return take;
}

/* Oversized payloads are skipped as they stream past, never stored. */
static size_t feed_discard(size_t n)
{
	size_t take = ps.len - ps.have;
	if (take > n)
		take = n;
	ps.have += take;
	ps.pos += take;
	if (ps.have == ps.len)
		ps.state = P_HEADER;
	return take;
}

/* Parses bytes that are known to hold no sync point the parser would misread; returns how many
 * it took (fewer if a handler lost the host). */
static size_t consume(const uint8_t *p, size_t n)
{
	size_t done = 0;
	while (done < n && g.connected) {
		size_t used;
		switch (ps.state) {
		case P_PAYLOAD:
			used = feed_payload(p + done, n - done);
			break;
		case P_DISCARD:
			used = feed_discard(n - done);
			break;
		default:
			used = feed_header(p + done, n - done);
			break;
		}
		done += used;
	}
	return done;
}

static bool parser_partial(void) { return ps.state != P_HEADER || ps.hlen > 0; }

/* Where the frame under way began (only meaningful while parser_partial()). */
static uint64_t frame_start(void) { return ps.state == P_HEADER ? ps.pos - ps.hlen : ps.start; }

/*
 * A host frame begins at stream position `at`, but the parser is not at its
 * start: what it holds is the remnant of a frame whose sender went away (or
 * garbage), and is dropped. A frame that began before `at` is reported as
 * `truncated`, under its id if its header was whole before `at`; not under
 * the id of the new frame, though, whose reply that would look like.
 */
static void cut(uint64_t at)
{
	/* Garbage already reported as bad_frame is not a frame to report again. */
	if (parser_partial() && frame_start() < at && !ps.resyncing) {
		uint8_t new_hdr[HDR_LEN];
		sync_recent(at, HDR_LEN, new_hdr);
		bool whole = ps.state != P_HEADER && ps.start + HDR_LEN <= at;
		uint32_t id = whole && ps.id != get_le32(new_hdr + 8) ? ps.id : 0;
		if (whole && ps.type == T_WRITE_DATA)
			files_abort_write(ps.id); /* its data has a hole now: the WRITE_CLOSE must fail */
		send_error(id, "truncated", 0, "frame cut short after %llu bytes: a new host frame began",
			   (unsigned long long)(at - frame_start()));
	}
	frame_reset();
	ps.pos = at;
}

/*
 * Bytes read but not parsed when a reply could not be written: the host end
 * had closed. They are not necessarily stale: a host that reopened the port
 * at once may have sent them before the agent saw the close, so they start
 * the next connection's stream if it comes soon enough.
 */
static uint8_t held[PARSER_READ_MAX + SYNC_LEN];
static size_t held_len;
static int64_t held_ms;

static void hold(const uint8_t *head, size_t k, const uint8_t *rest, size_t m)
{
	memcpy(held, head, k);
	memcpy(held + k, rest, m);
	held_len = k + m;
	held_ms = now_ms();
}

void parser_feed(const uint8_t *p, size_t n)
{
	/*
	 * The sync scan runs ahead of the parser to the end of the next sync point,
	 * so bytes of a new host's first frame never complete an old partial frame
	 * within one read. p[fed..] is not parsed yet, p[scanned..] not scanned yet.
	 */
	size_t fed = 0, scanned = 0;
	uint8_t head[SYNC_LEN];
	size_t k = 0; /* head[0..k): bytes of a sync point to parse before p[fed..] */
	while (fed < n && g.connected) {
		bool found = false;
		scanned += sync_scan(p + scanned, n - scanned, &found);
		if (!found) {
			fed += consume(p + fed, n - fed);
			break;
		}
		uint64_t base = sync_pos() - scanned; /* stream position of p[0] */
		uint64_t at = sync_pos() - SYNC_LEN;  /* where the sync point's frame begins */
		if (at >= base + fed) {
			size_t upto = (size_t)(at - base);
			fed += consume(p + fed, upto - fed);
			if (fed < upto)
				break;
			if (!sync_token_current()) {
				/* A FORK_FIXUP just now: scan the rest again for the new token. */
				sync_rewind(base + fed);
				scanned = fed;
				continue;
			}
			if (parser_partial())
				cut(at);
			/* The sync point's bytes are parsed as the next frame's in the next round. */
		} else if (!parser_partial() || frame_start() != at) {
			/* It began in an earlier read, whose bytes the parser took for something else:
			 * drop that and parse them again, as the start of a frame. */
			k = (size_t)(base + fed - at);
			sync_recent(at, k, head);
			cut(at);
			if (!g.connected)
				break;
			consume(head, k); /* part of a header and token: nothing to dispatch, no reply */
			k = 0;
		}
	}
	if (!g.connected && fed < n)
		hold(head, k, p + fed, n - fed);
	/* Taken after the handlers ran, so time spent serving does not count as a stall. */
	ps.last_ms = now_ms();
}

void parser_resume(void)
{
	static uint8_t again[sizeof held];
	size_t n = held_len;
	held_len = 0;
	if (n == 0 || now_ms() - held_ms > TRUNCATED_MS)
		return;
	memcpy(again, held, n); /* parser_feed may hold part of it again */
	parser_feed(again, n);
}

int64_t parser_deadline(void) { return parser_partial() ? ps.last_ms + TRUNCATED_MS : -1; }

void parser_check_timeout(int64_t now)
{
	if (!parser_partial() || now - ps.last_ms < TRUNCATED_MS)
		return;
	uint32_t id = ps.state == P_HEADER ? 0 : ps.id;
	send_error(id, "truncated", 0, "frame incomplete for %d ms; dropped", TRUNCATED_MS);
	frame_reset();
}

/* ---- field decoding ---- */

enum kind { K_IGNORE, K_STR, K_STR_REP, K_U64, K_BYTES };

/* Reply-only tags are still checked, so a request never carries a malformed known field. */
static const uint8_t kinds[F_TAG_MAX + 1] = {
	[F_ARGV] = K_STR_REP,     [F_SHELL] = K_STR,       [F_ENV] = K_STR_REP,
	[F_CWD] = K_STR,          [F_TIMEOUT_MS] = K_U64,  [F_STDIN_OPEN] = K_U64,
	[F_PID] = K_U64,          [F_EXIT_CODE] = K_U64,   [F_SIGNAL] = K_U64,
	[F_TIMED_OUT] = K_U64,    [F_TARGET] = K_U64,      [F_PATH] = K_STR,
	[F_MODE] = K_U64,         [F_SIZE] = K_U64,        [F_TYPE] = K_U64,
	[F_MTIME_MS] = K_U64,     [F_NAME] = K_STR,        [F_ENTRY] = K_IGNORE,
	[F_RECURSIVE] = K_U64,    [F_CODE] = K_STR,        [F_MESSAGE] = K_STR,
	[F_ERRNO] = K_U64,        [F_PROTO_VERSION] = K_U64, [F_AGENT_VERSION] = K_STR,
	[F_SEED] = K_BYTES,       [F_TIME_NS] = K_U64,     [F_HOSTNAME] = K_STR,
	[F_SANDBOX_ID] = K_STR,   [F_NEW_TOKEN] = K_BYTES, [F_TRUNCATED] = K_U64,
	[F_CREATED] = K_U64,      [F_UPTIME_MS] = K_U64,   [F_LIMIT] = K_U64,
	[F_DISCARD] = K_U64,
};

__attribute__((format(printf, 3, 4))) static bool fail(char *why, size_t whylen, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(why, whylen, fmt, ap);
	va_end(ap);
	return false;
}

static bool take_repeated(struct req *r, uint16_t tag, const uint8_t *v, char *why, size_t whylen)
{
	const char **list = tag == F_ARGV ? r->argv : r->env;
	size_t *count = tag == F_ARGV ? &r->argc : &r->envc;
	size_t max = tag == F_ARGV ? MAX_ARGV : MAX_ENV;
	if (*count >= max)
		return fail(why, whylen, "field %u repeated more than %zu times", tag, max);
	list[(*count)++] = (const char *)v;
	list[*count] = NULL;
	return true;
}

static bool take_field(struct req *r, uint16_t tag, const uint8_t *v, uint32_t len, char *why,
		       size_t whylen)
{
	enum kind k = kinds[tag];
	if (k == K_U64 && len != 8)
		return fail(why, whylen, "field %u: a u64 must be 8 bytes, not %u", tag, len);
	if ((k == K_STR || k == K_STR_REP) && memchr(v, 0, len))
		return fail(why, whylen, "field %u: text contains a NUL byte", tag);
	if (k == K_STR_REP && !take_repeated(r, tag, v, why, whylen))
		return false;
	if (k != K_STR_REP && r->has[tag])
		return fail(why, whylen, "field %u given twice", tag);
	if (k == K_U64)
		r->num[tag] = get_le64(v);
	r->has[tag] = true;
	r->val[tag] = v;
	r->len[tag] = len;
	return true;
}

/*
 * Decodes a field list in place. String values are NUL-terminated by overwriting
 * the first byte of the following field header once that header has been read,
 * so p must have one writable byte past n.
 */
bool req_parse(struct req *r, uint8_t *p, size_t n, char *why, size_t whylen)
{
	memset(r->has, 0, sizeof r->has);
	r->argc = r->envc = 0;
	r->argv[0] = r->env[0] = NULL;
	uint8_t *pending_nul = NULL;
	size_t off = 0;
	while (off < n) {
		if (n - off < 6)
			return fail(why, whylen, "field header cut short at byte %zu", off);
		uint16_t tag = get_le16(p + off);
		uint32_t len = get_le32(p + off + 2);
		if (pending_nul)
			*pending_nul = 0;
		pending_nul = NULL;
		off += 6;
		if (len > n - off)
			return fail(why, whylen, "field %u: length %u runs past the end", tag, len);
		uint8_t *v = p + off;
		off += len;
		if (tag > F_TAG_MAX || kinds[tag] == K_IGNORE)
			continue;
		if (!take_field(r, tag, v, len, why, whylen))
			return false;
		if (kinds[tag] == K_STR || kinds[tag] == K_STR_REP)
			pending_nul = v + len;
	}
	if (pending_nul)
		*pending_nul = 0;
	return true;
}

/* ---- field encoding ---- */

static uint8_t obuf[FRAME_MAX];

uint8_t *out_buffer(void) { return obuf; }

void body_start(struct body *b)
{
	b->p = obuf;
	b->len = 0;
}

bool body_fits(const struct body *b, size_t value_len) { return b->len + 6 + value_len <= FRAME_MAX; }

/* Callers only add fields of bounded size, or check body_fits first. */
void body_put(struct body *b, uint16_t tag, const void *v, size_t n)
{
	put_le16(b->p + b->len, tag);
	put_le32(b->p + b->len + 2, (uint32_t)n);
	if (n)
		memcpy(b->p + b->len + 6, v, n);
	b->len += 6 + n;
}

void body_u64(struct body *b, uint16_t tag, uint64_t v)
{
	uint8_t raw[8];
	put_le64(raw, v);
	body_put(b, tag, raw, 8);
}

void body_str(struct body *b, uint16_t tag, const char *s) { body_put(b, tag, s, strlen(s)); }

/* Starts a nested field list; returns the offset body_close needs. */
size_t body_open(struct body *b, uint16_t tag)
{
	size_t at = b->len;
	body_put(b, tag, NULL, 0);
	return at;
}

void body_close(struct body *b, size_t at) { put_le32(b->p + at + 2, (uint32_t)(b->len - at - 6)); }

/* ---- outgoing frames ---- */

static bool wait_writable(void)
{
	struct pollfd p = {.fd = g.port_fd, .events = POLLOUT};
	for (;;) {
		int n = poll(&p, 1, -1);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			return false;
		if (p.revents & POLLOUT)
			return true;
		if (p.revents & (POLLHUP | POLLERR | POLLNVAL))
			return false;
	}
}

static bool write_iov(struct iovec *iov, int cnt)
{
	for (;;) {
		while (cnt > 0 && iov->iov_len == 0) {
			iov++;
			cnt--;
		}
		if (cnt == 0)
			return true;
		ssize_t w = writev(g.port_fd, iov, cnt);
		if (w < 0) {
			if (errno == EINTR || (errno == EAGAIN && wait_writable()))
				continue;
			return false;
		}
		for (size_t left = (size_t)w; left > 0;) {
			size_t k = left < iov->iov_len ? left : iov->iov_len;
			iov->iov_base = (uint8_t *)iov->iov_base + k;
			iov->iov_len -= k;
			left -= k;
			if (iov->iov_len == 0) {
				iov++;
				cnt--;
			}
		}
	}
}

/* Frames to a host that has gone away are dropped; the event loop notices the loss. */
void send_frame(uint8_t type, uint32_t id, const void *body, size_t len)
{
	if (!g.connected)
		return;
	uint8_t hdr[HDR_LEN] = {0};
	memcpy(hdr, MAGIC, sizeof MAGIC);
	hdr[4] = type;
	put_le32(hdr + 8, id);
	put_le32(hdr + 12, (uint32_t)len);
	struct iovec iov[2] = {{hdr, HDR_LEN}, {(void *)body, len}};
	if (!write_iov(iov, 2)) {
		log_msg("host channel lost while writing");
		g.connected = false;
	}
}

void send_body(uint8_t type, uint32_t id, const struct body *b) { send_frame(type, id, b->p, b->len); }

void send_ok_empty(uint32_t id) { send_frame(T_OK, id, NULL, 0); }

/* Uses its own buffer, so it is safe while the shared output buffer holds a body. */
void send_error(uint32_t id, const char *code, int err, const char *fmt, ...)
{
	char msg[PATH_MAX + 512];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(msg, sizeof msg, fmt, ap);
	va_end(ap);

	uint8_t buf[sizeof msg + 64];
	struct body b = {buf, 0};
	body_str(&b, F_CODE, code);
	body_str(&b, F_MESSAGE, msg);
	if (err)
		body_u64(&b, F_ERRNO, (uint64_t)err);
	send_body(T_ERROR, id, &b);
}

const char *errno_code(int err)
{
	switch (err) {
	case ENOENT:
		return "not_found";
	case EEXIST:
		return "exists";
	case ENOTDIR:
		return "not_dir";
	case EISDIR:
		return "is_dir";
	case EACCES:
	case EPERM:
	case EROFS:
		return "permission";
	case ENOSPC:
	case EDQUOT:
		return "no_space";
	case ENOTEMPTY:
		return "not_empty";
	default:
		return "io";
	}
}

void send_errno(uint32_t id, int err, const char *what, const char *path)
{
	send_error(id, errno_code(err), err, "%s %s: %s", what, path, strerror(err));
}
