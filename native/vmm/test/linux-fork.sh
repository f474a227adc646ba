#!/bin/sh
# Runs inside the runner VM (busybox sh): boots the default image under
# clade-vmm (token off its command line), talks to its agent, floods the
# serial console (log capped), forks it (nested to depth 3, children in run
# directories of their own that outlive a killed parent) and checks
# isolation, snapshots it and starts from the snapshot, plays a forger
# against state.bin, then stops every VMM. Prints "check ok|FAIL <name>" lines and
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
# The kernel command line carries the agent token: it comes through a descriptor, never on clade-vmm's
# own command line (readable by every local user). The serial log is capped small here, so that a
# flood below rotates it several times.
LOGMAX=16384
printf '%s' "console=ttyS0 quiet panic=-1 mitigations=off random.trust_cpu=on i8042.noaux clade.token=$T clade.id=root clade.hostname=root" > $D/cmdline
$VMM run --socket $D/root.sock --agent-socket $D/root.agent --serial-log $D/root.serial --serial-log-max $LOGMAX --mem-mib 512 \
  --kernel /opt/img/vmlinux --initramfs /opt/img/initramfs.cpio --cmdline-fd 3 3< $D/cmdline \
  > $D/root.out 2>&1 &
ROOT=$!
rm $D/cmdline
check token-not-in-cmdline "$(tr '\0' ' ' < /proc/$ROOT/cmdline | grep -c $T)" "0"
check token-not-in-environ "$(tr '\0' ' ' < /proc/$ROOT/environ | grep -c $T)" "0"
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
check serial-log "$(cat $D/root.serial.1 $D/root.serial 2>/dev/null | grep -c -e serial-from-ttyS0 -e serial-from-console)" "2"
# A guest flooding its console: the log is rotated at the cap (one older file kept), never larger,
# and the VM keeps answering.
ts=$(cut -d' ' -f1 /proc/uptime)
$A exec $D/root.agent $T 'yes serial-flood-0123456789 | head -c 60000 > /dev/ttyS0' > /dev/null
te=$(cut -d' ' -f1 /proc/uptime)
echo "figure serial_flood_60k_s $(awk "BEGIN{print $te-$ts}")"
size=$(wc -c < $D/root.serial); size1=$(wc -c < $D/root.serial.1)
echo "figure serial_log_bytes $size $size1 (cap $LOGMAX)"
check serial-log-capped "$([ $size -le $LOGMAX ] && [ $size1 -le $LOGMAX ] && [ $size1 -gt $((LOGMAX / 2)) ] && echo yes)" "yes"
check serial-log-one-rotation "$(ls $D | grep -c 'root.serial')" "2"
check answers-after-flood "$($A exec $D/root.agent $T 'echo still-here')" "still-here"

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

# Children in run directories of their own (forks COUNT DIR...): P is a child of the root, Q a child of
# P. P is killed and its directory removed, as the engine does; Q still answers, forks (its grandchild's
# default socket lands in Q's own directory) and writes only its own serial log.
mkdir -p $D/p $D/q $D/r
out=$($A ctl $D/root.sock "forks 1 $D/p")
check forks-into-dir "$(echo "$out" | grep -o "\"socket\":\"$D/p/control.sock\"" | head -1)" "\"socket\":\"$D/p/control.sock\""
$A ctl $D/p/control.sock "forks 1 $D/q" > /dev/null
check child-in-own-dir "$($A exec $D/q/agent.sock $T 'echo q-alive')" "q-alive"
P=$(echo "$out" | grep -o '"pid":[0-9]*' | head -1 | cut -d: -f2)
kill -9 $P
rm -rf $D/p
sleep 1
check parent-gone "$(ls /proc | grep -cx "$P")" "0"
check orphan-answers "$($A exec $D/q/agent.sock $T 'echo q-still-here')" "q-still-here"
out=$($A fork-exec $D/q/control.sock $D/r/control.sock $D/r/agent.sock $T 'echo grandchild-after-parent-killed')
check fork-after-parent-killed "$(echo "$out" | head -1)" "grandchild-after-parent-killed"
out=$($A ctl $D/q/control.sock fork)
check default-socket-in-own-dir "$(echo "$out" | grep -o "\"socket\":\"$D/q/vmm-" | head -1)" "\"socket\":\"$D/q/vmm-"
DEFAULT_CHILD=$(echo "$out" | grep -o '"socket":"[^"]*"' | head -1 | cut -d'"' -f4)
$A exec $D/q/agent.sock $T 'echo serial-from-q > /dev/ttyS0' > /dev/null
check child-serial-own-log "$(grep -c serial-from-q $D/q/serial.log) $(cat $D/root.serial $D/root.serial.1 | grep -c serial-from-q)" "1 0"

# Snapshot to disk, start from it through inherited descriptors, then the tamper sweep.
mkdir -p $D/snap $D/tamper
$A ctl $D/root.sock "snapshot $D/snap" > /dev/null
w=0; while [ ! -f $D/snap/done ] && [ $w -lt 500 ]; do usleep 20000; w=$((w+1)); done
check snapshot-written "$(grep -o '"ok":true' $D/snap/done)" '"ok":true'
$VMM run --socket $D/restored.sock --agent-socket $D/restored.agent --serial-log $D/restored.serial \
  --restore-fds 3,4 3< $D/snap/memory.raw 4< $D/snap/state.bin > $D/restored.out 2>&1 &
w=0; while [ ! -S $D/restored.agent ] && [ $w -lt 250 ]; do usleep 20000; w=$((w+1)); done
check restored-answers "$($A exec $D/restored.agent $T 'echo restored-alive')" "restored-alive"
$A ctl $D/restored.sock quit > /dev/null
# PRINT_STATE=1: the booted guest's state.bin, base64, for the fuzz seed corpus (devices/fuzz/corpus/state).
if [ -n "$PRINT_STATE" ]; then echo "state-b64-begin"; base64 $D/snap/state.bin; echo "state-b64-end"; fi
out=$($A tamper $VMM $D/snap $D/tamper 37)
echo "$out" | grep -v '^tamper byte' | head -20
check tamper "$(echo "$out" | tail -1)" "tamper: all held"

for s in c3 c2 c1 root; do $A ctl $D/$s.sock quit > /dev/null; done
for s in $D/q/control.sock $D/r/control.sock $DEFAULT_CHILD; do $A ctl $s quit > /dev/null; done
sleep 1
left=$(ps | grep -c '[c]lade-vmm run')
check no-vmm-left "$left" "0"
check no-sockets-left "$(find $D -name '*sock*' | wc -l)" "0"
echo "root VMM output:"; cat $D/root.out
echo "done"
