/*
 * The CPL3 test guest. It runs in 64-bit mode at CPL3 from its first
 * instruction (the host set up paging, GDT and TSS), because CPL0 code is
 * emulated on some hosts and would be thousands of times slower.
 *
 * Loop: increment the counter; if the host left a command in the mailbox,
 * run it; after SPIN iterations write the counter to the heartbeat
 * register, which the VMM treats as "idle" (like HLT) so an idle guest
 * costs little CPU.
 *
 * The guest talks to the VMM by MMIO writes to an unbacked guest-physical
 * window (KVM_EXIT_MMIO). Port I/O is not used: on a host whose KVM runs
 * CPL3 natively in host user mode (PVM), OUT at CPL3 raises #GP even with
 * RFLAGS.IOPL = 3.
 *
 * Commands (GUEST_DATA + 8, argument at + 16; when done the guest clears the
 * command, then increments the ack word at + 24):
 *   1 echo:  write the argument to the report register
 *   2 crash: execute ud2; with no IDT this is a triple fault
 *   4 store: store the argument at GUEST_DATA + 32 (a guest-side write)
 * The code is position independent except for absolute data addresses.
 */
#define DATA 0x10000
#define COUNTER (DATA + 0)
#define CMD (DATA + 8)
#define ARG (DATA + 16)
#define ACK (DATA + 24)
#define STORED (DATA + 32)
#define MMIO_REPORT 0xc0000000
#define MMIO_HEARTBEAT 0xc0000008
#define SPIN 16384

    .section .rodata
    .globl cpl3_guest_code
    .globl cpl3_guest_code_end
    .code64
cpl3_guest_code:
restart:
    mov $SPIN, %ecx
spin:
    incq COUNTER
    mov CMD, %rax
    test %rax, %rax
    jnz command
    dec %ecx
    jnz spin
    mov COUNTER, %rax
    mov %rax, MMIO_HEARTBEAT
    jmp restart

command:
    cmp $1, %rax
    je echo
    cmp $2, %rax
    je crash
    cmp $4, %rax
    je store
    jmp done
echo:
    mov ARG, %rax
    mov %rax, MMIO_REPORT
    jmp done
crash:
    ud2
store:
    mov ARG, %rax
    mov %rax, STORED
done:
    movq $0, CMD
    incq ACK
    jmp restart
cpl3_guest_code_end:

    .section .note.GNU-stack, "", @progbits
