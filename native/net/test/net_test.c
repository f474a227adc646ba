/*
 * net_test: clade-net's frame filter, egress policy and DNS responder
 * against hand-made frames, hostile ones included (truncated at every
 * length, lying length fields, compression loops, random bytes). Built under
 * ASan/UBSan (make check), so a read past a frame fails the test.
 */
#include <arpa/inet.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "net.h"

static int checks, failed;
#define CHECK(cond)                                                                   \
	do {                                                                          \
		checks++;                                                             \
		if (!(cond)) {                                                        \
			failed++;                                                     \
			fprintf(stderr, "%s:%d: CHECK(%s) failed\n", __FILE__, __LINE__, #cond); \
		}                                                                     \
	} while (0)

static const uint8_t guest_mac[6] = {0x52, 0x54, 0x00, 0xc1, 0xad, 0x0f};
static const uint8_t gw_mac[6] = NET_GATEWAY_MAC;

static uint32_t ip(const char *s)
{
	struct in_addr in;
	inet_pton(AF_INET, s, &in);
	return ntohl(in.s_addr);
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

static uint16_t get16(const uint8_t *p)
{
	return (uint16_t)(p[0] << 8 | p[1]);
}

static uint16_t csum(const uint8_t *p, size_t n, uint32_t sum)
{
	for (size_t i = 0; i + 1 < n; i += 2)
		sum += get16(p + i);
	if (n & 1)
		sum += (uint32_t)p[n - 1] << 8;
	while (sum >> 16)
		sum = (sum & 0xffff) + (sum >> 16);
	return (uint16_t)~sum;
}

/* An Ethernet + IPv4 frame from the guest with `l4` as its payload; returns its length. */
static size_t guest_ip_frame(uint8_t *f, uint32_t dst, uint8_t proto, const uint8_t *l4, size_t l4len)
{
	memcpy(f, gw_mac, 6);
	memcpy(f + 6, guest_mac, 6);
	put16(f + 12, 0x0800);
	uint8_t *h = f + 14;
	memset(h, 0, 20);
	h[0] = 0x45;
	put16(h + 2, (uint16_t)(20 + l4len));
	h[8] = 64;
	h[9] = proto;
	put32(h + 12, NET_GUEST_IP);
	put32(h + 16, dst);
	put16(h + 10, csum(h, 20, 0));
	memcpy(h + 20, l4, l4len);
	return 14 + 20 + l4len;
}

static size_t tcp_syn(uint8_t *f, uint32_t dst, uint16_t dport)
{
	uint8_t t[20] = {0};
	put16(t, 40000);
	put16(t + 2, dport);
	put32(t + 4, 1000);
	t[12] = 5 << 4;
	t[13] = 0x02;
	return guest_ip_frame(f, dst, 6, t, sizeof t);
}

static size_t dns_query(uint8_t *f, const char *name, uint16_t id, uint16_t qtype)
{
	uint8_t u[8 + 512] = {0};
	uint8_t *q = u + 8;
	put16(q, id);
	put16(q + 2, 0x0100); /* RD */
	put16(q + 4, 1);
	size_t o = 12;
	for (const char *s = name; *s;) {
		const char *dot = strchr(s, '.');
		size_t l = dot ? (size_t)(dot - s) : strlen(s);
		q[o++] = (uint8_t)l;
		memcpy(q + o, s, l);
		o += l;
		s += l + (dot ? 1 : 0);
	}
	q[o++] = 0;
	put16(q + o, qtype);
	put16(q + o + 2, 1);
	o += 4;
	put16(u, 33333);
	put16(u + 2, 53);
	put16(u + 4, (uint16_t)(8 + o));
	return guest_ip_frame(f, NET_DNS_ADDR, 17, u, 8 + o);
}

static void test_policy(void)
{
	struct net_policy p;
	net_policy_init(&p);
	CHECK(net_policy_add_cidr(&p, "203.0.113.0/24"));
	CHECK(net_policy_add_cidr(&p, "198.51.100.7"));
	CHECK(!net_policy_add_cidr(&p, "198.51.100.7/33"));
	CHECK(!net_policy_add_cidr(&p, "198.51.100.7/24")); /* host bits set */
	CHECK(!net_policy_add_cidr(&p, "127.0.0.1"));
	CHECK(!net_policy_add_cidr(&p, "169.254.169.254"));
	CHECK(!net_policy_add_cidr(&p, "10.0.2.2"));
	CHECK(!net_policy_add_cidr(&p, "1.2.3"));
	CHECK(!net_policy_add_cidr(&p, "1.2.3.4/"));
	CHECK(!net_policy_add_cidr(&p, "1.2.3.4/-1"));
	CHECK(!net_policy_add_cidr(&p, "999999999999999999999999999999999999"));
	CHECK(net_policy_add_name(&p, "Example.COM"));
	CHECK(net_policy_add_name(&p, "*.pypi.org"));
	CHECK(!net_policy_add_name(&p, "bad name"));
	CHECK(!net_policy_add_name(&p, "a..b"));
	CHECK(!net_policy_add_name(&p, ".a"));
	char longname[400];
	memset(longname, 'a', sizeof longname - 1);
	longname[sizeof longname - 1] = '\0';
	CHECK(!net_policy_add_name(&p, longname));

	/* none: nothing; list: what is listed; all: anything but the never-reachable ranges. */
	CHECK(!net_allowed(&p, ip("203.0.113.9")));
	p.mode = NET_EGRESS_LIST;
	CHECK(net_allowed(&p, ip("203.0.113.9")));
	CHECK(net_allowed(&p, ip("198.51.100.7")));
	CHECK(!net_allowed(&p, ip("198.51.100.8")));
	CHECK(net_name_allowed(&p, "example.com"));
	CHECK(!net_name_allowed(&p, "www.example.com"));
	CHECK(net_name_allowed(&p, "files.pypi.org"));
	CHECK(!net_name_allowed(&p, "pypi.org"));
	CHECK(!net_name_allowed(&p, "evilpypi.org"));
	p.mode = NET_EGRESS_ALL;
	CHECK(net_allowed(&p, ip("8.8.8.8")));
	CHECK(!net_allowed(&p, ip("127.0.0.1")));
	CHECK(!net_allowed(&p, ip("169.254.169.254")));
	CHECK(!net_allowed(&p, ip("10.0.2.2")));
	CHECK(!net_allowed(&p, ip("224.0.0.1")));
	CHECK(!net_allowed(&p, ip("255.255.255.255")));
	/* The host's own addresses: only when listed exactly. */
	net_policy_add_host_address(&p, ip("192.0.2.10"));
	CHECK(!net_allowed(&p, ip("192.0.2.10")));
	CHECK(net_allowed(&p, ip("192.0.2.11")));
	CHECK(net_policy_add_cidr(&p, "192.0.2.10"));
	CHECK(net_allowed(&p, ip("192.0.2.10")));
	/* Resolved addresses: a bounded ring. */
	net_policy_init(&p);
	p.mode = NET_EGRESS_LIST;
	for (uint32_t i = 0; i < NET_RESOLVED_MAX + 10; i++)
		net_policy_add_resolved(&p, ip("203.0.0.0") + i);
	CHECK(p.nresolved == NET_RESOLVED_MAX);
	CHECK(net_allowed(&p, ip("203.0.0.0") + NET_RESOLVED_MAX + 9));
	CHECK(!net_allowed(&p, ip("203.0.0.0")));

	/* Internal networks: never through "all" or a DNS answer, only through a CIDR the user lists. */
	static const char *internal[] = {"10.1.2.3",     "172.16.0.1",  "172.31.255.254", "192.168.1.1", "100.64.0.1",
					 "100.100.100.200", "192.0.0.170", "198.18.0.1", "198.19.255.1", "168.63.129.16"};
	static const char *public[] = {"8.8.8.8", "172.32.0.1", "100.128.0.1", "198.20.0.1", "192.0.2.1", "168.63.129.17"};
	net_policy_init(&p);
	p.mode = NET_EGRESS_ALL;
	for (size_t i = 0; i < sizeof internal / sizeof *internal; i++) {
		CHECK(net_internal(ip(internal[i])));
		CHECK(!net_allowed(&p, ip(internal[i])));
	}
	for (size_t i = 0; i < sizeof public / sizeof *public; i++) {
		CHECK(!net_internal(ip(public[i])));
		CHECK(net_allowed(&p, ip(public[i])));
	}
	p.mode = NET_EGRESS_LIST;
	net_policy_add_resolved(&p, ip("10.9.9.9"));
	net_policy_add_resolved(&p, ip("100.100.100.200"));
	net_policy_add_resolved(&p, ip("127.0.0.1"));
	net_policy_add_resolved(&p, ip("169.254.169.254"));
	CHECK(p.nresolved == 0);
	CHECK(!net_allowed(&p, ip("10.9.9.9")));
	CHECK(net_policy_add_cidr(&p, "10.9.0.0/16"));
	CHECK(net_allowed(&p, ip("10.9.9.9")));
	CHECK(!net_allowed(&p, ip("10.8.9.9")));

	/* The host's addresses: a full table is an error, never a silently shorter list. */
	net_policy_init(&p);
	for (int i = 0; i < NET_MAX_HOST_ADDRS; i++)
		CHECK(net_policy_add_host_address(&p, ip("203.0.113.0") + (uint32_t)i));
	CHECK(!net_policy_add_host_address(&p, ip("198.51.100.1")));
}

static void test_filter(void)
{
	struct net_policy p;
	net_policy_init(&p);
	p.mode = NET_EGRESS_LIST;
	net_policy_add_cidr(&p, "203.0.113.0/24");
	uint8_t f[2048];

	size_t n = tcp_syn(f, ip("203.0.113.5"), 443);
	CHECK(net_filter_guest_frame(&p, f, n).action == NET_PASS);
	CHECK(memcmp(p.guest_mac, guest_mac, 6) == 0);

	/* A refused connection is answered with a reset that the guest accepts: ports swapped, checksums right. */
	n = tcp_syn(f, ip("198.51.100.1"), 443);
	struct net_verdict v = net_filter_guest_frame(&p, f, n);
	CHECK(v.action == NET_REPLY);
	CHECK(v.reply_len == 54);
	CHECK(memcmp(v.reply, guest_mac, 6) == 0);
	const uint8_t *h = v.reply + 14, *t = h + 20;
	CHECK(csum(h, 20, 0) == 0);
	uint8_t pseudo[12];
	memcpy(pseudo, h + 12, 8);
	pseudo[8] = 0;
	pseudo[9] = 6;
	put16(pseudo + 10, 20);
	uint32_t s = (uint16_t)~csum(pseudo, 12, 0);
	CHECK(csum(t, 20, s) == 0);
	CHECK(get16(t) == 443 && get16(t + 2) == 40000);
	CHECK(t[13] == 0x14); /* RST|ACK */
	CHECK(((uint32_t)get16(t + 8) << 16 | get16(t + 10)) == 1001);

	/* Not a SYN, not allowed: dropped silently. UDP too. */
	n = tcp_syn(f, ip("198.51.100.1"), 443);
	f[14 + 20 + 13] = 0x10;
	CHECK(net_filter_guest_frame(&p, f, n).action == NET_DROP);
	uint8_t u[16] = {0};
	n = guest_ip_frame(f, ip("198.51.100.1"), 17, u, sizeof u);
	CHECK(net_filter_guest_frame(&p, f, n).action == NET_DROP);

	/* ARP goes to passt; IPv6 and other types never do. */
	memset(f, 0, 64);
	put16(f + 12, 0x0806);
	CHECK(net_filter_guest_frame(&p, f, 42).action == NET_PASS);
	put16(f + 12, 0x86dd);
	CHECK(net_filter_guest_frame(&p, f, 64).action == NET_DROP);
	/* Frames passt would take as a reason to end the network: never passed on. */
	{
		uint8_t *big = calloc(1, NET_GUEST_FRAME_MAX + 1);
		put16(big + 12, 0x0806);
		CHECK(net_filter_guest_frame(&p, big, NET_ARP_FRAME_MAX).action == NET_PASS);
		CHECK(net_filter_guest_frame(&p, big, NET_ARP_FRAME_MAX + 1).action == NET_DROP);
		CHECK(net_filter_guest_frame(&p, big, NET_GUEST_FRAME_MAX + 1).action == NET_DROP);
		size_t syn = tcp_syn(big, ip("203.0.113.5"), 443);
		CHECK(net_filter_guest_frame(&p, big, syn).action == NET_PASS);
		CHECK(net_filter_guest_frame(&p, big, NET_GUEST_FRAME_MAX + 1).action == NET_DROP);
		free(big);
	}

	/* The gateway (the host) and loopback are never reachable, even with egress all. */
	p.mode = NET_EGRESS_ALL;
	n = tcp_syn(f, NET_GATEWAY, 22);
	CHECK(net_filter_guest_frame(&p, f, n).action == NET_REPLY);
	n = tcp_syn(f, ip("127.0.0.1"), 22);
	CHECK(net_filter_guest_frame(&p, f, n).action == NET_REPLY);

	/* Connections the host opened to a forwarded port: the guest's answers to the gateway pass; nothing else to it. */
	p.mode = NET_EGRESS_LIST;
	net_policy_add_forwarded(&p, 8000);
	uint8_t synack[20] = {0};
	put16(synack, 8000);
	put16(synack + 2, 50000);
	synack[12] = 5 << 4;
	synack[13] = 0x12;
	n = guest_ip_frame(f, NET_GATEWAY, 6, synack, sizeof synack);
	CHECK(net_filter_guest_frame(&p, f, n).action == NET_PASS);
	synack[13] = 0x02; /* a SYN from the forwarded port: an outbound connection, refused */
	n = guest_ip_frame(f, NET_GATEWAY, 6, synack, sizeof synack);
	CHECK(net_filter_guest_frame(&p, f, n).action == NET_REPLY);
	synack[13] = 0x10;
	put16(synack, 8001);
	n = guest_ip_frame(f, NET_GATEWAY, 6, synack, sizeof synack);
	CHECK(net_filter_guest_frame(&p, f, n).action == NET_DROP);
	put16(synack, 8000);
	n = guest_ip_frame(f, ip("198.51.100.1"), 6, synack, sizeof synack);
	CHECK(net_filter_guest_frame(&p, f, n).action == NET_DROP);

	/* Every truncation of a valid frame, and lying header lengths: never a read past the frame. */
	p.mode = NET_EGRESS_LIST;
	n = tcp_syn(f, ip("198.51.100.1"), 443);
	for (size_t len = 0; len < n; len++) {
		uint8_t *copy = malloc(len ? len : 1);
		memcpy(copy, f, len);
		struct net_verdict tv = net_filter_guest_frame(&p, copy, len);
		CHECK(tv.action == NET_DROP || tv.action == NET_PASS);
		free(copy);
	}
	for (int ihl = 0; ihl < 16; ihl++)
		for (int total = 0; total < 80; total += 3) {
			n = tcp_syn(f, ip("198.51.100.1"), 443);
			f[14] = (uint8_t)(0x40 | ihl);
			put16(f + 16, (uint16_t)total);
			uint8_t *copy = malloc(n);
			memcpy(copy, f, n);
			net_filter_guest_frame(&p, copy, n);
			free(copy);
		}
	/* A TCP data offset past the segment: no reset built from bytes that are not there. */
	n = tcp_syn(f, ip("198.51.100.1"), 443);
	f[14 + 20 + 12] = 15 << 4;
	CHECK(net_filter_guest_frame(&p, f, n).action == NET_DROP);
}

static void test_dns(void)
{
	struct net_policy p;
	net_policy_init(&p);
	p.mode = NET_EGRESS_LIST;
	net_policy_add_name(&p, "allowed.test");
	struct net_dns_pending pending[4] = {0};
	struct net_dns_out out;
	uint8_t f[2048];

	/* A name outside the list: NXDOMAIN from here, nothing upstream. */
	size_t n = dns_query(f, "blocked.test", 0x1234, 1);
	CHECK(net_filter_guest_frame(&p, f, n).action == NET_DNS_QUERY);
	net_dns_query(&p, pending, 4, f, n, 0, true, &out);
	CHECK(out.upstream_len == 0);
	CHECK(out.reply_len > 0);
	const uint8_t *q = out.reply + 14 + 20 + 8;
	CHECK(get16(q) == 0x1234 && (q[2] & 0x80) && (q[3] & 0x0f) == 3);
	CHECK(get16(out.reply + 14 + 20) == 53 && get16(out.reply + 14 + 22) == 33333);

	/* An allowed name without an upstream: SERVFAIL. */
	n = dns_query(f, "ALLOWED.test", 0x2222, 1);
	net_dns_query(&p, pending, 4, f, n, 0, false, &out);
	CHECK(out.upstream_len == 0 && (out.reply[14 + 20 + 8 + 3] & 0x0f) == 2);

	/* With one: asked upstream under a new id; the answer goes back under the guest's, its A record allowed. */
	net_dns_query(&p, pending, 4, f, n, 0, true, &out);
	CHECK(out.reply_len == 0 && out.upstream_len > 12);
	uint16_t up_id = get16(out.upstream);
	/* clade-net asks from this entry's own socket and hands back only this entry with the answer. */
	CHECK(out.slot >= 0 && out.slot < 4 && pending[out.slot].used && pending[out.slot].upstream_id == up_id);
	uint8_t ans[512];
	memcpy(ans, out.upstream, out.upstream_len);
	size_t al = out.upstream_len;
	put16(ans + 2, 0x8180);
	put16(ans + 6, 1);
	const uint8_t rr[] = {0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 198, 51, 100, 77};
	memcpy(ans + al, rr, sizeof rr);
	al += sizeof rr;
	put16(ans, (uint16_t)(up_id + 1)); /* a guess at the id: ignored */
	net_dns_answer(&p, pending, 4, ans, al, &out);
	CHECK(out.reply_len == 0);
	CHECK(!net_allowed(&p, ip("198.51.100.77")));
	put16(ans, up_id);
	/* Every truncation of the answer first: no crash, no address learnt from a cut record. */
	for (size_t len = 0; len < al; len++) {
		struct net_dns_out o2;
		uint8_t *copy = malloc(len ? len : 1);
		memcpy(copy, ans, len);
		net_dns_answer(&p, pending, 4, copy, len, &o2);
		free(copy);
		if (o2.reply_len) {
			/* a cut answer still answers the question, but learns nothing */
			CHECK(!net_allowed(&p, ip("198.51.100.77")));
			pending[0].used = pending[1].used = pending[2].used = pending[3].used = false;
			net_dns_query(&p, pending, 4, f, n, 0, true, &out);
			up_id = get16(out.upstream);
			put16(ans, up_id);
		}
	}
	net_dns_answer(&p, pending, 4, ans, al, &out);
	CHECK(out.reply_len > 0);
	CHECK(get16(out.reply + 14 + 20 + 8) == 0x2222);
	CHECK(net_allowed(&p, ip("198.51.100.77")));
	net_dns_answer(&p, pending, 4, ans, al, &out); /* a replay: the question was answered already */
	CHECK(out.reply_len == 0);

	/* A compression loop and a record that claims more data than there is. */
	net_dns_query(&p, pending, 4, f, n, 0, true, &out);
	memcpy(ans, out.upstream, out.upstream_len);
	al = out.upstream_len;
	put16(ans + 2, 0x8180);
	put16(ans + 6, 3);
	const uint8_t bad[] = {0xc0, (uint8_t)al, 0, 1, 0, 1, 0, 0, 0, 60, 0xff, 0xff, 1, 2, 3, 4};
	memcpy(ans + al, bad, sizeof bad);
	net_dns_answer(&p, pending, 4, ans, al + sizeof bad, &out);
	CHECK(out.reply_len > 0);

	/* The pending table fills: further questions are dropped, and expire. */
	for (int i = 0; i < 6; i++)
		net_dns_query(&p, pending, 4, f, n, 0, true, &out);
	CHECK(out.upstream_len == 0);
	net_dns_expire(pending, 4, NET_DNS_TIMEOUT_MS + 1);
	net_dns_query(&p, pending, 4, f, n, NET_DNS_TIMEOUT_MS + 1, true, &out);
	CHECK(out.upstream_len > 0);

	/* Names at the limit: 253 characters are a name, 254 are refused (no answer, nothing upstream). */
	{
		struct net_policy all;
		net_policy_init(&all);
		all.mode = NET_EGRESS_ALL;
		char name[300], l63[64], l62[63], l61[62];
		memset(l63, 'a', 63), l63[63] = '\0';
		memset(l62, 'b', 62), l62[62] = '\0';
		memset(l61, 'c', 61), l61[61] = '\0';
		struct net_dns_pending pend[2] = {0};
		snprintf(name, sizeof name, "%s.%s.%s.%s", l63, l63, l63, l61);
		CHECK(strlen(name) == 253);
		n = dns_query(f, name, 7, 1);
		net_dns_query(&all, pend, 2, f, n, 0, true, &out);
		CHECK(out.upstream_len > 0 && strlen(pend[0].name) == 253);
		snprintf(name, sizeof name, "%s.%s.%s.%s", l63, l63, l63, l62);
		CHECK(strlen(name) == 254);
		n = dns_query(f, name, 8, 1);
		net_dns_query(&all, pend, 2, f, n, 0, true, &out);
		CHECK(out.upstream_len == 0 && out.reply_len == 0 && !pend[1].used);
	}

	/* An allowed name that answers with an internal address opens nothing: the LAN stays closed. */
	net_dns_expire(pending, 4, INT64_MAX);
	n = dns_query(f, "allowed.test", 0x3333, 1);
	net_dns_query(&p, pending, 4, f, n, 0, true, &out);
	memcpy(ans, out.upstream, out.upstream_len);
	al = out.upstream_len;
	put16(ans + 2, 0x8180);
	put16(ans + 6, 1);
	const uint8_t lan[] = {0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 192, 168, 1, 1};
	memcpy(ans + al, lan, sizeof lan);
	al += sizeof lan;
	net_dns_answer(&p, pending, 4, ans, al, &out);
	CHECK(out.reply_len > 0); /* the guest gets its answer */
	CHECK(!net_allowed(&p, ip("192.168.1.1")));

	/* Hostile queries: a UDP length past the packet, a label past the end, every truncation. */
	n = dns_query(f, "allowed.test", 1, 1);
	put16(f + 14 + 20 + 4, 2000);
	net_dns_query(&p, pending, 4, f, n, 0, true, &out);
	CHECK(out.reply_len == 0 && out.upstream_len == 0);
	n = dns_query(f, "allowed.test", 1, 1);
	f[14 + 20 + 8 + 12] = 63;
	net_dns_query(&p, pending, 4, f, n, 0, true, &out);
	CHECK(out.reply_len == 0 && out.upstream_len == 0);
	n = dns_query(f, "blocked.test", 1, 1);
	for (size_t len = 0; len < n; len++) {
		uint8_t *copy = malloc(len ? len : 1);
		memcpy(copy, f, len);
		if (net_filter_guest_frame(&p, copy, len).action == NET_DNS_QUERY)
			net_dns_query(&p, pending, 4, copy, len, 0, true, &out);
		free(copy);
	}
}

/* Random frames and random answers, some of them shaped like the real thing. */
static void test_random(void)
{
	struct net_policy p;
	net_policy_init(&p);
	p.mode = NET_EGRESS_LIST;
	net_policy_add_name(&p, "*.test");
	struct net_dns_pending pending[8] = {0};
	struct net_dns_out out;
	srand(12345);
	uint8_t f[1600];
	for (int iter = 0; iter < 200000; iter++) {
		size_t n = (size_t)(rand() % (int)sizeof f);
		for (size_t i = 0; i < n; i++)
			f[i] = (uint8_t)rand();
		if (iter % 2 && n > 60) {
			uint8_t base[1600];
			size_t bn = dns_query(base, "a.test", 7, 1);
			memcpy(f, base, bn < n ? bn : n);
			f[rand() % (int)n] = (uint8_t)rand();
		}
		uint8_t *copy = malloc(n ? n : 1);
		memcpy(copy, f, n);
		if (net_filter_guest_frame(&p, copy, n).action == NET_DNS_QUERY)
			net_dns_query(&p, pending, 8, copy, n, 0, true, &out);
		net_dns_answer(&p, pending, 8, copy, n, &out);
		free(copy);
	}
	CHECK(1);
}

/* The announcement is a well-formed gratuitous ARP from the guest, which the filter itself would pass. */
static void test_announcement(void)
{
	uint8_t f[NET_ANNOUNCE_LEN];
	net_guest_announcement(f);
	const uint8_t mac[6] = NET_GUEST_MAC, bcast[6] = {0xff, 0xff, 0xff, 0xff, 0xff, 0xff};
	const uint8_t ip[4] = {10, 0, 2, 15}, head[8] = {0, 1, 8, 0, 6, 4, 0, 1};
	CHECK(!memcmp(f, bcast, 6) && !memcmp(f + 6, mac, 6) && f[12] == 0x08 && f[13] == 0x06);
	CHECK(!memcmp(f + 14, head, 8) && !memcmp(f + 22, mac, 6) && !memcmp(f + 28, ip, 4));
	CHECK(!memcmp(f + 38, ip, 4));
	struct net_policy p;
	net_policy_init(&p);
	CHECK(net_filter_guest_frame(&p, f, sizeof f).action == NET_PASS);
	CHECK(!memcmp(p.guest_mac, mac, 6));
}

int main(void)
{
	test_announcement();
	test_policy();
	test_filter();
	test_dns();
	test_random();
	printf("%s: %d checks, %d failed\n", failed ? "FAIL" : "PASS", checks, failed);
	return failed != 0;
}
