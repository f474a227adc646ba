#!/bin/sh
# Runs inside the runner VM (busybox sh): boots the default image under
# clade-vmm, talks to its agent, forks it (nested to depth 3) and checks
# isolation, then stops every VMM. Prints "check ok|FAIL <name>" lines and
# "figure <name> <value>" lines; test/runner/vmm-linux.test.ts reads them.
# Every client call has its own deadline; the runner's time limit backs them up.
VMM=/opt/vmm/clade-vmm
A=/opt/vmm/vmm-agent
T=00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff
T2=ffeeddccbbaa99887766554433221100ffeeddccbbaa99887766554433221100
D=/tmp/vmm-linux
mkdir -p $D
check() { if [ "$2" = "$3" ]; then echo "check ok $1"; else echo "check FAIL $1: expected [$3] got [$2]"; fi; }

t0=$(cut -d' ' -f1 /proc/uptime)
$VMM run --socket $D/root.sock --agent-socket $D/root.agent --serial-log $D/root.serial --mem-mib 512 \
  --kernel /opt/img/vmlinux --initramfs /opt/img/initramfs.cpio \
  --cmdline "console=ttyS0 quiet panic=-1 mitigations=off random.trust_cpu=on i8042.noaux clade.token=$T clade.id=root clade.hostname=root" \
  > $D/root.out 2>&1 &
# Agent clients come and go while the guest boots (before its agent opened the port); the control
# socket must answer all along, and the next client must then get its HELLO answered.
w=0; while [ ! -S $D/root.agent -o ! -S $D/root.sock ] && [ $w -lt 250 ]; do usleep 20000; w=$((w+1)); done
out=$($A churn $D/root.agent $D/root.sock $T 2500)
echo "$out"
check early-clients "$(echo "$out" | grep -o 'status always answered')" "status always answered"
out=$($A hello $D/root.agent $T 90000 2>&1)
t1=$(cut -d' ' -f1 /proc/uptime)
echo "$out"
echo "figure boot_to_hello_s $(awk "BEGIN{print $t1-$t0}")"
check hello "$(echo "$out" | cut -c1-8)" "hello ok"
# The image takes the newest 6.12 kernel the archive offers; its exact version changes.
check uname "$($A exec $D/root.agent $T 'uname -r' | cut -d. -f1,2)" "6.12"
# Parks back to back (state, pause, resume): the next park may come before the resumed vCPU thread
# ran at all. Every request must be answered, and the agent must still answer afterwards.
out=$($A parks $D/root.sock 200)
echo "$out"
check parks "$(echo "$out" | grep -o '^parks: 200 requests answered')" "parks: 200 requests answered"
check agent-after-parks "$($A exec $D/root.agent $T 'echo still-here')" "still-here"
# Userspace can write to the serial port: the 8250's IRQ (IOAPIC pin 4) is wired and has fired, and
# the lines reach --serial-log (before the DSDT described the UART, these writes failed with EIO).
out=$($A exec $D/root.agent $T 'echo serial-from-ttyS0 > /dev/ttyS0 && echo serial-from-console > /dev/console &&
  awk '"'"'/ttyS0/ { print $(NF-1), $NF, ($2 > 0 ? "fired" : "silent") }'"'"' /proc/interrupts')
check serial-irq "$out" "4-edge ttyS0 fired"
check serial-log "$(grep -c -e serial-from-ttyS0 -e serial-from-console $D/root.serial)" "2"

# Fork the root; the child answers on its own agent socket.
out=$($A fork-exec $D/root.sock $D/c1.sock $D/c1.agent $T 'echo child-alive')
echo "$out"
check child-answers "$(echo "$out" | head -1)" "child-alive"
echo "figure fork $(echo "$out" | grep '^fork-exec')"
# Isolation: a file written in the parent after the fork is not in the child.
$A exec $D/root.agent $T 'echo parent > /root/after-fork' > /dev/null
check parent-sees-file "$($A exec $D/root.agent $T 'cat /root/after-fork')" "parent"
check child-isolated "$($A exec $D/c1.agent $T 'test -e /root/after-fork && echo leaked || echo absent')" "absent"
# The child takes a new identity, as the engine does after every fork.
$A fixup $D/c1.agent $T $T2 c1 child-one > /dev/null
check fixup "$?" "0"
check new-token "$($A exec $D/c1.agent $T2 'hostname')" "child-one"
# The child's copy of the UART and its IOAPIC route work too (the write waits for the drain).
check child-serial "$($A exec $D/c1.agent $T2 'echo serial-from-child > /dev/ttyS0 && echo written')" "written"

# Nested: the child forks a grandchild, which forks a great-grandchild.
out=$($A fork-exec $D/c1.sock $D/c2.sock $D/c2.agent $T2 'hostname')
check depth2 "$(echo "$out" | head -1)" "child-one"
echo "figure fork2 $(echo "$out" | grep '^fork-exec')"
$A exec $D/c2.agent $T2 'echo depth2 > /root/mark' > /dev/null
out=$($A fork-exec $D/c2.sock $D/c3.sock $D/c3.agent $T2 'cat /root/mark')
check depth3 "$(echo "$out" | head -1)" "depth2"
echo "figure fork3 $(echo "$out" | grep '^fork-exec')"
check depth3-status "$($A ctl $D/c3.sock status | grep -o '"depth":3')" '"depth":3'
check c1-unaffected "$($A exec $D/c1.agent $T2 'cat /root/mark 2>/dev/null || echo none')" "none"
check root-still-answers "$($A exec $D/root.agent $T 'echo root-alive')" "root-alive"

for s in c3 c2 c1 root; do $A ctl $D/$s.sock quit > /dev/null; done
sleep 1
left=$(ps | grep -c '[c]lade-vmm run')
check no-vmm-left "$left" "0"
check no-sockets-left "$(ls $D | grep -c sock)" "0"
echo "root VMM output:"; cat $D/root.out
echo "done"
