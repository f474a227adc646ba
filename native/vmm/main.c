/*
 * clade-vmm entry point.
 *
 *   clade-vmm run --socket PATH [--mem-mib N] [--idle-us N]
 *
 * Starts one VM running the CPL3 test guest and serves the control protocol
 * (docs/vmm.md) on PATH. Prints one JSON line on stdout once it accepts
 * requests. Every forked child is a process of its own with its own socket.
 */
#include "vmm.h"

#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define DEFAULT_MEM_MIB 64
#define MAX_MEM_MIB 1024 /* the test guest's page tables map at most 1 GiB */
#define DEFAULT_IDLE_US 10000

struct options {
    const char *socket_path;
    uint64_t mem_mib;
    uint64_t idle_us;
};

int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static int usage(void) {
    fprintf(stderr, "usage: clade-vmm run --socket PATH [--mem-mib N] [--idle-us N]\n");
    return 2;
}

static int parse_number(const char *s, uint64_t lo, uint64_t hi, uint64_t *out) {
    char *end;
    errno = 0;
    unsigned long long v = s ? strtoull(s, &end, 10) : 0;
    if (!s || errno || *end || v < lo || v > hi) return -1;
    *out = v;
    return 0;
}

static int parse_options(int argc, char **argv, struct options *o) {
    *o = (struct options){.mem_mib = DEFAULT_MEM_MIB, .idle_us = DEFAULT_IDLE_US};
    if (argc < 2 || strcmp(argv[1], "run")) return -1;
    for (int i = 2; i < argc; i++) {
        const char *value = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(argv[i], "--socket") && value) o->socket_path = value;
        else if (!strcmp(argv[i], "--mem-mib")) {
            if (parse_number(value, 2, MAX_MEM_MIB, &o->mem_mib) < 0) return -1;
        } else if (!strcmp(argv[i], "--idle-us")) {
            if (parse_number(value, 0, 1000000, &o->idle_us) < 0) return -1;
        } else return -1;
        i++;
    }
    return o->socket_path ? 0 : -1;
}

static int fail(const char *what) {
    fprintf(stderr, "clade-vmm: %s: %s\n", what, strerror(errno));
    return 1;
}

/* The root VM: everything a child later inherits is learned here, once. */
static int build_root_vm(struct vmm *v, const struct options *o) {
    if (vm_open(&v->vm, o->mem_mib << 20) < 0) return fail("open /dev/kvm and guest RAM");
    if (vm_build_kvm_objects(&v->vm) < 0) return fail("create VM");
    vm_learn_features(&v->vm);
    if (vm_probe_msrs(&v->vm) < 0) return fail("list MSRs");
    if (cpl3_guest_install(&v->vm) < 0) return fail("install CPL3 test guest");
    if (state_alloc(&v->vm, &v->state) < 0) return fail("allocate state buffers");
    return 0;
}

int main(int argc, char **argv) {
    struct options o;
    if (parse_options(argc, argv, &o) < 0) return usage();
    /* Children are reaped by the kernel (no zombies); a dead parent's children are adopted by init. */
    signal(SIGCHLD, SIG_IGN);
    signal(SIGPIPE, SIG_IGN);
    static struct vmm v;
    v.cpu.vm = &v.vm;
    v.cpu.idle_us = (uint32_t)o.idle_us;
    if (build_root_vm(&v, &o)) return 1;
    int listen_fd;
    if (control_listen(o.socket_path, &listen_fd) < 0) return fail("listen on control socket");
    if (control_init(&v.ctl, listen_fd, o.socket_path) < 0) return fail("control channel");
    if (vcpu_init_sync(&v.cpu) < 0 || vcpu_start(&v.cpu) < 0) return unlink(o.socket_path), fail("start vCPU");
    printf("{\"ready\":true,\"pid\":%d,\"socket\":\"%s\",\"msrs\":%u,\"xsaveBytes\":%u,\"xsave2\":%s,\"sregs2\":%s,"
           "\"tscOffsetAttr\":%s}\n",
           (int)getpid(), o.socket_path, v.vm.msr_count, v.vm.xsave_size, v.vm.has_xsave2 ? "true" : "false",
           v.vm.has_sregs2 ? "true" : "false", v.vm.has_tsc_offset_attr ? "true" : "false");
    fflush(stdout);
    return control_serve(&v);
}
