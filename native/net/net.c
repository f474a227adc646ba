/* net.c: egress policy, guest frame filter and DNS responder of clade-net (see net.h). */
#include "net.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>

#define ETH_P_IP 0x0800
#define ETH_P_ARP 0x0806
#define PROTO_TCP 6
#define PROTO_UDP 17
#define TCP_FIN 0x01
#define TCP_SYN 0x02
#define TCP_RST 0x04
#define TCP_ACK 0x10

static const uint8_t gateway_mac[6] = NET_GATEWAY_MAC;

static uint16_t get16(const uint8_t *p)
{
	return (uint16_t)(p[0] << 8 | p[1]);
}

static uint32_t get32(const uint8_t *p)
{
	return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static void put16(uint8_t *p, uint16_t v)
{
	p[0] = (uint8_t)(v >> 8);
	p[1] = (uint8_t)v;
}

static void put32(uint8_t *p, uint32_t v)
{
	put16(p, (uint16_t)(v >> 16));
	put16(p + 2, (uint16_t)v);
}

/* ---- policy ---- */

void net_policy_init(struct net_policy *p)
{
	memset(p, 0, sizeof *p);
	p->mode = NET_EGRESS_NONE;
	memset(p->guest_mac, 0xff, sizeof p->guest_mac);
}

static bool in_cidr(uint32_t addr, uint32_t net, unsigned bits)
{
	uint32_t mask = bits ? ~0u << (32 - bits) : 0;
	return (addr & mask) == (net & mask);
}

/* Never a destination: this host's loopback, "this network", link-local (cloud metadata services),
 * multicast, reserved and broadcast, and the guest's own subnet (gateway and DNS are clade-net's). */
bool net_never_reachable(uint32_t a)
{
	return in_cidr(a, 0x00000000u, 8) || in_cidr(a, 0x7F000000u, 8) || in_cidr(a, 0xA9FE0000u, 16) ||
	       in_cidr(a, 0xE0000000u, 3) || in_cidr(a, NET_SUBNET, 24);
}

/*
 * Internal addresses: private networks (the host's LAN, containers, other
 * VMs), carrier-grade NAT (where some clouds put their metadata service),
 * IETF protocol assignments, benchmarking, and Azure's host endpoint. Egress
 * "all" means the internet, and a name's DNS answer must not open the LAN:
 * only a CIDR the user lists reaches these.
 */
bool net_internal(uint32_t a)
{
	return in_cidr(a, 0x0A000000u, 8) || in_cidr(a, 0xAC100000u, 12) || in_cidr(a, 0xC0A80000u, 16) ||
	       in_cidr(a, 0x64400000u, 10) || in_cidr(a, 0xC0000000u, 24) || in_cidr(a, 0xC6120000u, 15) ||
	       a == 0xA83F8110u /* 168.63.129.16 */;
}

bool net_policy_add_cidr(struct net_policy *p, const char *text)
{
	char buf[32];
	if (p->nallow == NET_MAX_ENTRIES || strlen(text) >= sizeof buf)
		return false;
	strcpy(buf, text);
	unsigned bits = 32;
	char *slash = strchr(buf, '/');
	if (slash) {
		*slash = '\0';
		char *end;
		if (!isdigit((unsigned char)slash[1]))
			return false;
		unsigned long b = strtoul(slash + 1, &end, 10);
		if (*end || b > 32)
			return false;
		bits = (unsigned)b;
	}
	struct in_addr in;
	if (inet_pton(AF_INET, buf, &in) != 1)
		return false;
	uint32_t addr = ntohl(in.s_addr);
	uint32_t mask = bits ? ~0u << (32 - bits) : 0;
	if ((addr & mask) != addr)
		return false; /* host bits set: ambiguous */
	if (bits >= 8 && net_never_reachable(addr))
		return false;
	p->allow_addr[p->nallow] = addr;
	p->allow_mask[p->nallow] = mask;
	p->nallow++;
	return true;
}

/* Lower-cases a host name in place; false unless it is LDH labels of 1-63 characters, 253 in all. */
static bool normalize_name(char *s)
{
	size_t n = strlen(s), label = 0;
	if (n == 0 || n > NET_NAME_MAX || s[0] == '.' || s[n - 1] == '.')
		return false;
	for (size_t i = 0; i < n; i++) {
		char c = (char)tolower((unsigned char)s[i]);
		s[i] = c;
		if (c == '.') {
			if (label == 0)
				return false;
			label = 0;
		} else if (isalnum((unsigned char)c) || c == '-' || c == '_') {
			if (++label > 63)
				return false;
		} else
			return false;
	}
	return true;
}

bool net_policy_add_name(struct net_policy *p, const char *text)
{
	if (p->nnames == NET_MAX_ENTRIES)
		return false;
	bool wildcard = strncmp(text, "*.", 2) == 0;
	const char *name = wildcard ? text + 2 : text;
	if (strlen(name) > NET_NAME_MAX)
		return false;
	char buf[NET_NAME_MAX + 1];
	strcpy(buf, name);
	if (!normalize_name(buf))
		return false;
	strcpy(p->names[p->nnames], buf);
	p->wildcard[p->nnames] = wildcard;
	p->nnames++;
	return true;
}

bool net_policy_add_forwarded(struct net_policy *p, uint16_t guest_port)
{
	if (p->nforwarded == NET_MAX_PORTS || guest_port == 0)
		return false;
	p->forwarded[p->nforwarded++] = guest_port;
	return true;
}

/*
 * A segment of a connection the host opened to a forwarded port: from that
 * guest port to the gateway, ACK set. Such a segment never makes passt open
 * anything (only a SYN without ACK does), so it cannot start an outbound
 * connection.
 */
static bool forwarded_reply(const struct net_policy *p, uint32_t dst, uint8_t proto, const uint8_t *l4, size_t l4len, bool first)
{
	if (dst != NET_GATEWAY || proto != 6 || !first || l4len < 20 || !(l4[13] & 0x10))
		return false;
	uint16_t sport = get16(l4);
	for (int i = 0; i < p->nforwarded; i++)
		if (p->forwarded[i] == sport)
			return true;
	return false;
}

bool net_policy_add_host_address(struct net_policy *p, uint32_t addr)
{
	if (p->nhost == NET_MAX_HOST_ADDRS)
		return false;
	p->host_addrs[p->nhost++] = addr;
	return true;
}

void net_policy_add_resolved(struct net_policy *p, uint32_t addr)
{
	if (net_never_reachable(addr) || net_internal(addr))
		return;
	for (int i = 0; i < p->nresolved; i++)
		if (p->resolved[i] == addr)
			return;
	if (p->nresolved < NET_RESOLVED_MAX) {
		p->resolved[p->nresolved++] = addr;
		return;
	}
	p->resolved[p->resolved_next] = addr;
	p->resolved_next = (p->resolved_next + 1) % NET_RESOLVED_MAX;
}

bool net_allowed(const struct net_policy *p, uint32_t dst)
{
	if (net_never_reachable(dst))
		return false;
	for (int i = 0; i < p->nhost; i++) {
		if (p->host_addrs[i] != dst)
			continue;
		for (int j = 0; j < p->nallow; j++)
			if (p->allow_mask[j] == ~0u && p->allow_addr[j] == dst)
				return true;
		return false;
	}
	if (p->mode == NET_EGRESS_ALL)
		return !net_internal(dst);
	if (p->mode == NET_EGRESS_NONE)
		return false;
	for (int i = 0; i < p->nallow; i++)
		if ((dst & p->allow_mask[i]) == p->allow_addr[i])
			return true;
	for (int i = 0; i < p->nresolved; i++)
		if (p->resolved[i] == dst)
			return true;
	return false;
}

bool net_name_allowed(const struct net_policy *p, const char *name)
{
	if (p->mode == NET_EGRESS_ALL)
		return true;
	if (p->mode == NET_EGRESS_NONE)
		return false;
	size_t n = strlen(name);
	for (int i = 0; i < p->nnames; i++) {
		size_t m = strlen(p->names[i]);
		if (!p->wildcard[i] && strcmp(name, p->names[i]) == 0)
			return true;
		if (p->wildcard[i] && n > m + 1 && name[n - m - 1] == '.' && strcmp(name + n - m, p->names[i]) == 0)
			return true;
	}
	return false;
}

/* ---- packets ---- */

static uint32_t sum_bytes(uint32_t sum, const uint8_t *p, size_t n)
{
	for (size_t i = 0; i + 1 < n; i += 2)
		sum += get16(p + i);
	if (n & 1)
		sum += (uint32_t)p[n - 1] << 8;
	return sum;
}

static uint16_t fold(uint32_t sum)
{
	while (sum >> 16)
		sum = (sum & 0xffff) + (sum >> 16);
	return (uint16_t)~sum;
}

/* An IPv4 packet in a frame: header fields the filter needs, checked against the frame's length. */
struct ip4 {
	const uint8_t *hdr;
	size_t hlen, total;
	uint32_t src, dst;
	uint8_t proto;
	bool first_fragment; /* carries the transport header */
	bool whole;          /* not fragmented at all */
};

static bool parse_ip4(const uint8_t *frame, size_t len, struct ip4 *ip)
{
	if (len < NET_ETH_HLEN + 20)
		return false;
	const uint8_t *h = frame + NET_ETH_HLEN;
	size_t room = len - NET_ETH_HLEN;
	if (h[0] >> 4 != 4)
		return false;
	ip->hlen = (size_t)(h[0] & 0x0f) * 4;
	ip->total = get16(h + 2);
	if (ip->hlen < 20 || ip->total < ip->hlen || ip->total > room)
		return false;
	ip->hdr = h;
	ip->proto = h[9];
	ip->src = get32(h + 12);
	ip->dst = get32(h + 16);
	uint16_t frag = get16(h + 6);
	ip->first_fragment = (frag & 0x1fff) == 0;
	ip->whole = ip->first_fragment && !(frag & 0x2000);
	return true;
}

static void eth_ip_header(uint8_t *f, const uint8_t dst_mac[6], uint32_t src, uint32_t dst, uint8_t proto, size_t payload)
{
	memcpy(f, dst_mac, 6);
	memcpy(f + 6, gateway_mac, 6);
	put16(f + 12, ETH_P_IP);
	uint8_t *h = f + NET_ETH_HLEN;
	memset(h, 0, 20);
	h[0] = 0x45;
	put16(h + 2, (uint16_t)(20 + payload));
	put16(h + 6, 0x4000); /* don't fragment */
	h[8] = 64;
	h[9] = proto;
	put32(h + 12, src);
	put32(h + 16, dst);
	put16(h + 10, fold(sum_bytes(0, h, 20)));
}

static uint16_t l4_checksum(uint32_t src, uint32_t dst, uint8_t proto, const uint8_t *seg, size_t len)
{
	uint8_t pseudo[12];
	put32(pseudo, src);
	put32(pseudo + 4, dst);
	pseudo[8] = 0;
	pseudo[9] = proto;
	put16(pseudo + 10, (uint16_t)len);
	return fold(sum_bytes(sum_bytes(0, pseudo, 12), seg, len));
}

/* A reset for a TCP segment the guest sent: a refused connection fails at once instead of timing out. */
static size_t tcp_reset(const uint8_t *frame, const struct ip4 *ip, uint8_t *out)
{
	const uint8_t *th = ip->hdr + ip->hlen;
	size_t seg = ip->total - ip->hlen;
	size_t doff = (size_t)(th[12] >> 4) * 4;
	if (doff < 20 || doff > seg)
		return 0;
	uint8_t flags = th[13];
	uint32_t seq = get32(th + 4), ack = get32(th + 8);
	uint32_t advance = (uint32_t)(seg - doff) + ((flags & TCP_SYN) ? 1 : 0) + ((flags & TCP_FIN) ? 1 : 0);
	eth_ip_header(out, frame + 6, ip->dst, ip->src, PROTO_TCP, 20);
	uint8_t *t = out + NET_ETH_HLEN + 20;
	memset(t, 0, 20);
	memcpy(t, th + 2, 2); /* source port: the one the guest called */
	memcpy(t + 2, th, 2);
	if (flags & TCP_ACK) {
		put32(t + 4, ack);
		t[13] = TCP_RST;
	} else {
		put32(t + 8, seq + advance);
		t[13] = TCP_RST | TCP_ACK;
	}
	t[12] = 5 << 4;
	put16(t + 16, l4_checksum(ip->dst, ip->src, PROTO_TCP, t, 20));
	return NET_ETH_HLEN + 40;
}

void net_guest_announcement(uint8_t out[NET_ANNOUNCE_LEN])
{
	static const uint8_t guest_mac[6] = NET_GUEST_MAC;
	memset(out, 0, NET_ANNOUNCE_LEN);
	memset(out, 0xff, 6); /* broadcast */
	memcpy(out + 6, guest_mac, 6);
	put16(out + 12, ETH_P_ARP);
	uint8_t *arp = out + NET_ETH_HLEN;
	put16(arp, 1);            /* Ethernet */
	put16(arp + 2, ETH_P_IP); /* IPv4 */
	arp[4] = 6;
	arp[5] = 4;
	put16(arp + 6, 1); /* request */
	memcpy(arp + 8, guest_mac, 6);
	put32(arp + 14, NET_GUEST_IP);
	put32(arp + 24, NET_GUEST_IP); /* target hardware address stays zero */
}

struct net_verdict net_filter_guest_frame(struct net_policy *p, const uint8_t *frame, size_t len)
{
	struct net_verdict v = {.action = NET_DROP};
	if (len < NET_ETH_HLEN || len > NET_GUEST_FRAME_MAX)
		return v; /* passt would end the whole network over a longer one */
	if (!(frame[6] & 1))
		memcpy(p->guest_mac, frame + 6, 6);
	uint16_t type = get16(frame + 12);
	if (type == ETH_P_ARP) {
		if (len > NET_ARP_FRAME_MAX)
			return v;
		v.action = NET_PASS; /* passt answers ARP itself and opens nothing for it */
		return v;
	}
	struct ip4 ip;
	if (type != ETH_P_IP || !parse_ip4(frame, len, &ip))
		return v; /* IPv6 and everything else: this network is IPv4 only */
	const uint8_t *l4 = ip.hdr + ip.hlen;
	size_t l4len = ip.total - ip.hlen;
	bool syn = ip.proto == PROTO_TCP && ip.first_fragment && l4len >= 20 && (l4[13] & (TCP_SYN | TCP_RST)) == TCP_SYN;
	if (ip.dst == NET_DNS_ADDR) {
		if (ip.proto == PROTO_UDP && ip.whole && l4len >= 8 && get16(l4 + 2) == 53)
			v.action = NET_DNS_QUERY;
		else if (syn && (v.reply_len = tcp_reset(frame, &ip, v.reply)))
			v.action = NET_REPLY;
		return v;
	}
	if (net_allowed(p, ip.dst) || forwarded_reply(p, ip.dst, ip.proto, l4, l4len, ip.first_fragment)) {
		v.action = NET_PASS;
		return v;
	}
	if (syn && (v.reply_len = tcp_reset(frame, &ip, v.reply)))
		v.action = NET_REPLY;
	return v;
}

/* ---- DNS ---- */

/* Reads the uncompressed question name at msg[*off] as lower-case dotted text; false if malformed. */
static bool read_qname(const uint8_t *msg, size_t len, size_t *off, char name[NET_NAME_MAX + 1])
{
	size_t o = *off, n = 0;
	for (;;) {
		if (o >= len)
			return false;
		uint8_t l = msg[o++];
		if (l == 0)
			break;
		/* the label, and the dot before it unless it is the first, must fit in NET_NAME_MAX */
		if (l > 63 || o + l > len || n + (n ? 1u : 0u) + l > NET_NAME_MAX)
			return false;
		if (n)
			name[n++] = '.';
		for (uint8_t i = 0; i < l; i++) {
			char c = (char)tolower(msg[o + i]);
			if (c == '.' || c == '\0')
				return false;
			name[n++] = c;
		}
		o += l;
	}
	name[n] = '\0';
	*off = o;
	return n > 0;
}

/* Skips a possibly compressed name in a resource record. */
static bool skip_name(const uint8_t *msg, size_t len, size_t *off)
{
	size_t o = *off;
	for (int labels = 0; labels < 128; labels++) {
		if (o >= len)
			return false;
		uint8_t l = msg[o];
		if (l == 0) {
			*off = o + 1;
			return true;
		}
		if ((l & 0xc0) == 0xc0) {
			if (o + 2 > len)
				return false;
			*off = o + 2;
			return true;
		}
		if (l > 63)
			return false;
		o += 1 + (size_t)l;
	}
	return false;
}

/* A UDP datagram from 10.0.2.3:53 to the guest, holding `dns`. */
static size_t udp_to_guest(const struct net_policy *p, uint32_t guest_ip, uint16_t guest_port, const uint8_t *dns, size_t n,
			   uint8_t *out)
{
	eth_ip_header(out, p->guest_mac, NET_DNS_ADDR, guest_ip, PROTO_UDP, 8 + n);
	uint8_t *u = out + NET_ETH_HLEN + 20;
	put16(u, 53);
	put16(u + 2, guest_port);
	put16(u + 4, (uint16_t)(8 + n));
	put16(u + 6, 0);
	memcpy(u + 8, dns, n);
	uint16_t sum = l4_checksum(NET_DNS_ADDR, guest_ip, PROTO_UDP, u, 8 + n);
	put16(u + 6, sum ? sum : 0xffff);
	return NET_ETH_HLEN + 20 + 8 + n;
}

/* An answer made here: the question echoed back with `rcode` and no records. */
static void dns_refuse(const struct net_policy *p, const struct ip4 *ip, const uint8_t *q, size_t qend, uint8_t rcode,
		       struct net_dns_out *out)
{
	uint8_t msg[12 + NET_NAME_MAX + 2 + 4];
	if (qend > sizeof msg)
		return;
	memcpy(msg, q, qend);
	msg[2] = (uint8_t)(0x80 | (q[2] & 0x79)); /* QR, the query's opcode and RD */
	msg[3] = (uint8_t)(0x80 | rcode);        /* RA */
	put16(msg + 4, 1);
	memset(msg + 6, 0, 6);
	const uint8_t *udp = ip->hdr + ip->hlen;
	out->reply_len = udp_to_guest(p, ip->src, get16(udp), msg, qend, out->reply);
}

void net_dns_query(struct net_policy *p, struct net_dns_pending *pending, int npending, const uint8_t *frame, size_t len,
		   int64_t now, bool have_upstream, struct net_dns_out *out)
{
	out->reply_len = out->upstream_len = 0;
	out->slot = -1;
	struct ip4 ip;
	if (!parse_ip4(frame, len, &ip) || ip.proto != PROTO_UDP)
		return;
	if (!ip.whole || ip.total - ip.hlen < 8)
		return; /* the UDP header must be there before it is read */
	const uint8_t *udp = ip.hdr + ip.hlen;
	size_t ulen = get16(udp + 4);
	if (ulen < 8 + 12 || ulen > ip.total - ip.hlen || ulen - 8 > NET_DNS_MAX)
		return;
	const uint8_t *q = udp + 8;
	size_t qlen = ulen - 8;
	if ((q[2] & 0x80) || (q[2] & 0x78) || get16(q + 4) != 1)
		return; /* not a standard query with one question */
	size_t off = 12;
	char name[NET_NAME_MAX + 1];
	if (!read_qname(q, qlen, &off, name) || off + 4 > qlen)
		return;
	uint16_t qtype = get16(q + off);
	size_t qend = off + 4;
	if (!net_name_allowed(p, name)) {
		dns_refuse(p, &ip, q, qend, 3, out); /* NXDOMAIN: this name does not exist for this sandbox */
		return;
	}
	if (!have_upstream) {
		dns_refuse(p, &ip, q, qend, 2, out); /* SERVFAIL */
		return;
	}
	struct net_dns_pending *slot = NULL;
	for (int i = 0; i < npending && !slot; i++)
		if (!pending[i].used)
			slot = &pending[i];
	if (!slot)
		return; /* a flood: the guest asks again */
	uint16_t id;
	do {
		if (getrandom(&id, sizeof id, 0) != sizeof id)
			return;
		for (int i = 0; i < npending; i++)
			if (pending[i].used && pending[i].upstream_id == id)
				id = 0;
	} while (id == 0);
	slot->used = true;
	slot->upstream_id = id;
	slot->guest_id = get16(q);
	slot->guest_port = get16(udp);
	slot->guest_ip = ip.src;
	slot->qtype = qtype;
	slot->deadline = now + NET_DNS_TIMEOUT_MS;
	strcpy(slot->name, name);
	memcpy(out->upstream, q, qlen);
	put16(out->upstream, id);
	out->upstream_len = qlen;
	out->slot = (int)(slot - pending);
}

void net_dns_answer(struct net_policy *p, struct net_dns_pending *pending, int npending, const uint8_t *msg, size_t len,
		    struct net_dns_out *out)
{
	out->reply_len = out->upstream_len = 0;
	out->slot = -1;
	if (len < 12 || len > NET_DNS_MAX || !(msg[2] & 0x80) || get16(msg + 4) != 1)
		return;
	struct net_dns_pending *slot = NULL;
	for (int i = 0; i < npending && !slot; i++)
		if (pending[i].used && pending[i].upstream_id == get16(msg))
			slot = &pending[i];
	if (!slot)
		return;
	size_t off = 12;
	char name[NET_NAME_MAX + 1];
	if (!read_qname(msg, len, &off, name) || off + 4 > len || strcmp(name, slot->name) || get16(msg + off) != slot->qtype)
		return; /* not the answer to what was asked */
	size_t qend = off + 4;
	off = qend;
	uint16_t answers = get16(msg + 6);
	for (uint16_t i = 0; i < answers; i++) {
		if (!skip_name(msg, len, &off) || off + 10 > len)
			break;
		uint16_t type = get16(msg + off), class = get16(msg + off + 2), rdlen = get16(msg + off + 8);
		off += 10;
		if (off + rdlen > len)
			break;
		if (type == 1 && class == 1 && rdlen == 4 && p->mode == NET_EGRESS_LIST)
			net_policy_add_resolved(p, get32(msg + off));
		off += rdlen;
	}
	uint8_t copy[NET_DNS_MAX];
	size_t n = len;
	memcpy(copy, msg, len);
	put16(copy, slot->guest_id);
	if (n > NET_DNS_REPLY_MAX) {
		n = qend; /* the question alone, marked truncated */
		copy[2] |= 0x02;
		memset(copy + 6, 0, 6);
	}
	out->reply_len = udp_to_guest(p, slot->guest_ip, slot->guest_port, copy, n, out->reply);
	slot->used = false;
}

void net_dns_expire(struct net_dns_pending *pending, int npending, int64_t now)
{
	for (int i = 0; i < npending; i++)
		if (pending[i].used && now > pending[i].deadline)
			pending[i].used = false;
}
