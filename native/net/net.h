/*
 * net.h: the parts of clade-net that judge frames: the egress policy, the
 * guest-side filter, the DNS responder and the frames it answers with. Plain
 * C11 over byte buffers (no descriptors), so it is tested and fuzzed on its own.
 */
#ifndef CLADE_NET_H
#define CLADE_NET_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* The guest's network, the same in every sandbox: each has a stack of its own. */
#define NET_GUEST_IP 0x0A00020Fu /* 10.0.2.15 */
#define NET_GATEWAY 0x0A000202u  /* 10.0.2.2 */
#define NET_DNS_ADDR 0x0A000203u /* 10.0.2.3 */
#define NET_SUBNET 0x0A000200u   /* 10.0.2.0/24 */
#define NET_GUEST_IP_STR "10.0.2.15"
#define NET_GATEWAY_STR "10.0.2.2"
#define NET_DNS_STR "10.0.2.3"
#define NET_GATEWAY_MAC_STR "52:54:00:c1:ad:02"
#define NET_GATEWAY_MAC {0x52, 0x54, 0x00, 0xc1, 0xad, 0x02}
/* Every sandbox's NIC has this address (both engines give it). */
#define NET_GUEST_MAC {0x52, 0x54, 0x00, 0xc1, 0xad, 0x0f}
#define NET_ANNOUNCE_LEN 42

#define NET_ETH_HLEN 14
#define NET_FRAME_MAX 65550 /* 802.3 header + the largest IPv4 packet + slack: what the stream framing accepts */
#define NET_GUEST_FRAME_MAX 65535 /* the longest frame passed to passt (and what clade-vmm's NIC sends) */
#define NET_ARP_FRAME_MAX 128   /* an ARP frame with generous padding */
#define NET_MAX_ENTRIES 64
#define NET_MAX_PORTS 32
#define NET_MAX_HOST_ADDRS 256
#define NET_RESOLVED_MAX 4096
#define NET_NAME_MAX 253
#define NET_DNS_MAX 4096
#define NET_DNS_PENDING 64
#define NET_DNS_TIMEOUT_MS 5000
#define NET_DNS_REPLY_MAX 1472 /* what fits one 1500-byte packet; longer answers are cut with TC set */

enum net_egress { NET_EGRESS_NONE, NET_EGRESS_LIST, NET_EGRESS_ALL };

struct net_policy {
	enum net_egress mode;
	uint32_t allow_addr[NET_MAX_ENTRIES], allow_mask[NET_MAX_ENTRIES];
	int nallow;
	char names[NET_MAX_ENTRIES][NET_NAME_MAX + 1]; /* lower case; a wildcard's without its "*." */
	bool wildcard[NET_MAX_ENTRIES];
	int nnames;
	uint32_t host_addrs[NET_MAX_HOST_ADDRS];
	int nhost;
	/* IPv4 addresses DNS gave for allowed names: allowed from then on (a ring when full). */
	uint32_t resolved[NET_RESOLVED_MAX];
	int nresolved, resolved_next;
	uint8_t guest_mac[6];
	/* Guest TCP ports the host reaches (--tcp): passt presents those connections as coming from the gateway. */
	uint16_t forwarded[NET_MAX_PORTS];
	int nforwarded;
};

void net_policy_init(struct net_policy *p);
/* "A.B.C.D" or "A.B.C.D/N"; false if malformed, full, or never reachable (loopback and the like). */
bool net_policy_add_cidr(struct net_policy *p, const char *text);
/* "name.example" or "*.example"; false if not a host name or full. */
bool net_policy_add_name(struct net_policy *p, const char *text);
/* A guest TCP port forwarded from the host; false when full. */
bool net_policy_add_forwarded(struct net_policy *p, uint16_t guest_port);
/* One of this host's own addresses; false when full (the caller must not run with a partial list). */
bool net_policy_add_host_address(struct net_policy *p, uint32_t addr);
/* An address DNS gave for an allowed name; internal and never-reachable addresses are not learnt. */
void net_policy_add_resolved(struct net_policy *p, uint32_t addr);
/* Whether the guest may send to `dst` (host byte order). */
bool net_allowed(const struct net_policy *p, uint32_t dst);
bool net_never_reachable(uint32_t addr);
/* Private networks and the like: reachable only through an explicit CIDR in the allow-list. */
bool net_internal(uint32_t addr);
bool net_name_allowed(const struct net_policy *p, const char *name);

enum net_action { NET_DROP, NET_PASS, NET_REPLY, NET_DNS_QUERY };

struct net_verdict {
	enum net_action action;
	uint8_t reply[64]; /* a TCP reset for NET_REPLY */
	size_t reply_len;
};

/* Judges one Ethernet frame the guest sent. Learns the guest's MAC address. */
struct net_verdict net_filter_guest_frame(struct net_policy *p, const uint8_t *frame, size_t len);

/*
 * The guest's gratuitous ARP (who-has 10.0.2.15, from 10.0.2.15 at
 * NET_GUEST_MAC), for passt: passt sends the guest's frames to the MAC
 * address it last saw the guest use, and a VM that joins a new stack mid-life
 * (a fork's child, a start from a snapshot) may send nothing before the first
 * forwarded connection arrives. passt learns the address from this and
 * answers nothing.
 */
void net_guest_announcement(uint8_t out[NET_ANNOUNCE_LEN]);

struct net_dns_pending {
	bool used;
	uint16_t upstream_id, guest_id, guest_port, qtype;
	uint32_t guest_ip;
	int64_t deadline;
	char name[NET_NAME_MAX + 1];
};

struct net_dns_out {
	uint8_t reply[NET_ETH_HLEN + 20 + 8 + NET_DNS_REPLY_MAX]; /* a frame for the guest */
	size_t reply_len;
	uint8_t upstream[NET_DNS_MAX]; /* a query for the host's resolver */
	size_t upstream_len;
	int slot; /* the pending entry the upstream query belongs to, -1 when none */
};

/* A guest's DNS query frame (NET_DNS_QUERY): an answer for the guest, a query upstream, or nothing. */
void net_dns_query(struct net_policy *p, struct net_dns_pending *pending, int npending, const uint8_t *frame, size_t len,
		   int64_t now, bool have_upstream, struct net_dns_out *out);
/*
 * The upstream resolver's datagram: the guest's answer (and allowed addresses
 * learnt), or nothing. clade-net asks each query from a socket of its own
 * (a fresh source port) and passes only that query's entry as `pending`.
 */
void net_dns_answer(struct net_policy *p, struct net_dns_pending *pending, int npending, const uint8_t *msg, size_t len,
		    struct net_dns_out *out);
void net_dns_expire(struct net_dns_pending *pending, int npending, int64_t now);

#endif
