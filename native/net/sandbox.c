/*
 * clade-net's seccomp filter (see sandbox.h). clade-net parses a hostile
 * guest's frames; if a bug there were ever exploited, this keeps the process
 * to moving bytes between the descriptors it already holds.
 *
 * The program is a straight list: check the architecture, then for each
 * allowed system call "is it this one? then allow", with argument checks for
 * socket, kill and mmap; anything not listed kills the process.
 */
#include <errno.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <netinet/in.h>
#include <stddef.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>

#include "sandbox.h"

#if defined(__x86_64__)
#define FILTER_ARCH AUDIT_ARCH_X86_64
#elif defined(__aarch64__)
#define FILTER_ARCH AUDIT_ARCH_AARCH64
#else
#error "clade-net's seccomp filter knows x86_64 and aarch64; add this architecture's AUDIT_ARCH"
#endif

#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
#define ARG_LO(i) (offsetof(struct seccomp_data, args) + 8 * (i))
#else
#define ARG_LO(i) (offsetof(struct seccomp_data, args) + 8 * (i) + 4)
#endif

/* The socket clade-net makes for each DNS query; nothing else. */
#define DNS_SOCKET_TYPE (SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC)

static const int allowed[] = {
	__NR_read, __NR_write, __NR_writev, __NR_close, __NR_recvfrom, __NR_sendto, __NR_accept4, __NR_connect,
	__NR_ppoll, __NR_clock_gettime, __NR_gettimeofday, __NR_clock_nanosleep, __NR_nanosleep, __NR_getrandom,
	__NR_wait4, __NR_brk, __NR_munmap, __NR_mremap, __NR_madvise, __NR_exit, __NR_exit_group, __NR_rt_sigreturn,
	__NR_restart_syscall, __NR_newfstatat, __NR_fstat,
#ifdef __NR_poll
	__NR_poll,
#endif
};

struct program {
	struct sock_filter ins[128];
	unsigned short n;
};

static void emit(struct program *p, struct sock_filter ins)
{
	p->ins[p->n++] = ins;
}

static void load(struct program *p, unsigned offset)
{
	emit(p, (struct sock_filter)BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offset));
}

static void ret(struct program *p, unsigned what)
{
	emit(p, (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, what));
}

/* Kills unless the argument's low 32 bits equal `value` (the calls checked take ints). */
static void require_arg(struct program *p, int arg, unsigned value)
{
	load(p, ARG_LO(arg));
	emit(p, (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, value, 1, 0));
	ret(p, SECCOMP_RET_KILL_PROCESS);
}

/* "If the call is `nr`, run the next `len` instructions (which end in a return); else skip them." */
static void when_call(struct program *p, int nr, unsigned char len)
{
	emit(p, (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, (unsigned)nr, 0, len));
}

bool net_sandbox_enter(pid_t passt_pid)
{
	struct program p = {.n = 0};
	load(&p, offsetof(struct seccomp_data, arch));
	emit(&p, (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, FILTER_ARCH, 1, 0));
	ret(&p, SECCOMP_RET_KILL_PROCESS);
	load(&p, offsetof(struct seccomp_data, nr));
#ifdef __x86_64__
	/* x32 calls reach the same table under other numbers: none of them. */
	emit(&p, (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JGE | BPF_K, 0x40000000u, 0, 1));
	ret(&p, SECCOMP_RET_KILL_PROCESS);
#endif
	for (size_t i = 0; i < sizeof allowed / sizeof allowed[0]; i++) {
		when_call(&p, allowed[i], 1);
		ret(&p, SECCOMP_RET_ALLOW);
	}
	when_call(&p, __NR_socket, 10);
	require_arg(&p, 0, AF_INET);
	require_arg(&p, 1, DNS_SOCKET_TYPE);
	require_arg(&p, 2, 0);
	ret(&p, SECCOMP_RET_ALLOW);
	when_call(&p, __NR_kill, 4);
	require_arg(&p, 0, (unsigned)passt_pid);
	ret(&p, SECCOMP_RET_ALLOW);
	/* Memory, never executable: no new code, whatever a bug lets a guest write. */
	when_call(&p, __NR_mmap, 4);
	load(&p, ARG_LO(2));
	emit(&p, (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JSET | BPF_K, PROT_EXEC, 0, 1));
	ret(&p, SECCOMP_RET_KILL_PROCESS);
	ret(&p, SECCOMP_RET_ALLOW);
	ret(&p, SECCOMP_RET_KILL_PROCESS);

	struct sock_fprog prog = {.len = p.n, .filter = p.ins};
	return prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog, 0, 0) == 0;
}
