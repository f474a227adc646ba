/*
 * sync.c: finds where host frames begin in the incoming byte stream, whatever
 * the parser currently thinks, so the stream can be realigned.
 *
 * The host end of the port can close and reopen between two polls of the
 * agent (a quick reconnect, a busy guest). The agent then never reads EOF and
 * sees one stream: the new host's first frame would be swallowed as the rest
 * of a frame the old host left unfinished (up to 1 MiB of it). Every host
 * frame starts with a 16-byte header followed by the current 32-byte token,
 * and the host never sends the token anywhere else, so those 48 bytes mark a
 * frame start that data cannot imitate without knowing the token.
 *
 * The search is a shift-and automaton over a 48-bit state: one table lookup,
 * shift and AND per byte, linear in the stream, carried across reads, and
 * skipping with memchr while no match is under way.
 */
#include "agent.h"

#include <string.h>

#define RING 64 /* power of two, at least SYNC_LEN: the last bytes scanned, for replay */

_Static_assert(SYNC_LEN <= 64, "the match state is one 64-bit word");
_Static_assert(RING >= SYNC_LEN && (RING & (RING - 1)) == 0, "the ring holds a whole sync point");

static uint64_t mask[256];        /* bit j: this byte may sit at offset j of a sync point */
static uint8_t built_for[TOKEN_LEN]; /* the token mask[] was built for */
static bool built;
static uint64_t state;            /* bit j: the last j+1 bytes match offsets 0..j */
static uint64_t pos;              /* bytes scanned since the stream began */
static uint8_t ring[RING];        /* byte at stream position q is ring[q % RING] */

static void allow(size_t off, unsigned lo, unsigned hi)
{
	for (unsigned b = lo; b <= hi; b++)
		mask[b] |= 1ull << off;
}

/* Offsets: magic, a host type (high bit clear), zero flags and reserved bytes, any id, a length
 * below 1 MiB + 64 KiB (byte 14 at most 0x10, byte 15 zero; exact bounds are checked on a match),
 * then the token. */
static void build(void)
{
	memset(mask, 0, sizeof mask);
	for (size_t i = 0; i < 4; i++)
		allow(i, "CLD1"[i], "CLD1"[i]);
	allow(4, 0x01, 0x7f);
	for (size_t i = 5; i < 8; i++)
		allow(i, 0, 0);
	for (size_t i = 8; i < 14; i++)
		allow(i, 0, 0xff);
	allow(14, 0, FRAME_MAX >> 16);
	allow(15, 0, 0);
	for (size_t i = 0; i < TOKEN_LEN; i++)
		allow(HDR_LEN + i, g.token[i], g.token[i]);
	memcpy(built_for, g.token, TOKEN_LEN);
	built = true;
	state = 0;
}

bool sync_token_current(void) { return built && memcmp(built_for, g.token, TOKEN_LEN) == 0; }

void sync_reset(void)
{
	state = 0;
	pos = 0;
}

uint64_t sync_pos(void) { return pos; }

void sync_rewind(uint64_t to)
{
	pos = to;
	state = 0;
}

void sync_recent(uint64_t from, size_t len, uint8_t *out)
{
	for (size_t i = 0; i < len; i++)
		out[i] = ring[(from + i) % RING];
}

/* Bytes passed over while no match is under way: only the last RING of them can be replayed. */
static void remember(const uint8_t *p, size_t n)
{
	size_t keep = n < RING ? n : RING;
	for (size_t i = n - keep; i < n; i++)
		ring[(pos + i) % RING] = p[i];
	pos += n;
}

/* The per-byte classes cannot say "32 to 1 MiB"; checked when a match completes. */
static bool plausible_length(void)
{
	uint8_t len[4];
	sync_recent(pos - SYNC_LEN + 12, 4, len);
	uint32_t v = (uint32_t)len[0] | (uint32_t)len[1] << 8 | (uint32_t)len[2] << 16 | (uint32_t)len[3] << 24;
	return v >= TOKEN_LEN && v <= FRAME_MAX;
}

size_t sync_scan(const uint8_t *p, size_t n, bool *found)
{
	if (!sync_token_current())
		build();
	const uint64_t last = 1ull << (SYNC_LEN - 1);
	uint64_t d = state;
	size_t i = 0;
	*found = false;
	while (i < n) {
		if (d == 0) {
			/* Only the magic's first byte can start a match. */
			const uint8_t *c = memchr(p + i, 'C', n - i);
			size_t skip = c ? (size_t)(c - (p + i)) : n - i;
			remember(p + i, skip);
			i += skip;
			if (!c)
				break;
		}
		uint8_t b = p[i++];
		ring[pos++ % RING] = b;
		d = ((d << 1) | 1) & mask[b];
		if ((d & last) && plausible_length()) {
			*found = true;
			break;
		}
	}
	state = d;
	return i;
}
