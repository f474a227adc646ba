/*
 * libFuzzer target: one input is a guest frame, then (after the first 0xff
 * 0x00 pair, if any) an upstream DNS answer, both fed to the code that reads
 * them, under one policy with pending questions (make fuzz-run).
 */
#include <string.h>

#include "net.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	static struct net_policy p;
	static struct net_dns_pending pending[8];
	static int ready;
	if (!ready) {
		net_policy_init(&p);
		p.mode = NET_EGRESS_LIST;
		net_policy_add_name(&p, "*.test");
		net_policy_add_cidr(&p, "203.0.113.0/24");
		ready = 1;
	}
	size_t split = size;
	for (size_t i = 0; i + 1 < size; i++)
		if (data[i] == 0xff && data[i + 1] == 0x00) {
			split = i;
			break;
		}
	struct net_dns_out out;
	struct net_verdict v = net_filter_guest_frame(&p, data, split);
	if (v.action == NET_DNS_QUERY)
		net_dns_query(&p, pending, 8, data, split, 0, 1, &out);
	if (split + 2 <= size) {
		/* Let the answer match a pending question's id, so its records are read. */
		uint8_t msg[NET_DNS_MAX];
		size_t n = size - split - 2 < sizeof msg ? size - split - 2 : sizeof msg;
		memcpy(msg, data + split + 2, n);
		if (n >= 2 && pending[0].used) {
			msg[0] = (uint8_t)(pending[0].upstream_id >> 8);
			msg[1] = (uint8_t)pending[0].upstream_id;
		}
		net_dns_answer(&p, pending, 8, msg, n, &out);
	}
	net_dns_expire(pending, 8, 1 << 30);
	return 0;
}
