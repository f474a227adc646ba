#ifndef CLADE_NET_SANDBOX_H
#define CLADE_NET_SANDBOX_H

#include <stdbool.h>
#include <sys/types.h>

/*
 * Confines clade-net to what relaying frames needs, for the rest of its life
 * (a seccomp filter; the caller has set no_new_privs). Allowed: reading,
 * writing and polling descriptors it holds, accepting on its listening
 * socket, a UDP socket per DNS query, memory without PROT_EXEC, the clock,
 * randomness, reaping and signalling its passt (only `passt_pid`), exiting.
 * Anything else (opening files, exec, other sockets, ptrace, signals to other
 * processes) kills the process. False, with errno, if the kernel refused it.
 */
bool net_sandbox_enter(pid_t passt_pid);

#endif
