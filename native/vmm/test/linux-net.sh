#!/bin/sh
# Runs inside the runner VM (busybox sh): boots the default image under
# clade-vmm with a NIC (--net) whose socket is vmm-agent's stand-in network
# process, checks that the guest's eth0 has the MAC and carrier, sends
# frames and receives one, then forks the VM into a run directory whose
# net.sock is another stand-in and checks the child connected to it.
# Prints "check ok|FAIL <name>" lines.
VMM=/opt/vmm/clade-vmm
A=/opt/vmm/vmm-agent
T=00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff
D=/tmp/vmm-net
mkdir -p $D/child
check() { if [ "$2" = "$3" ]; then echo "check ok $1"; else echo "check FAIL $1: expected [$3] got [$2]"; fi; }

$A netsink $D/net.sock 120 > $D/root.net 2>&1 &
SINK=$!
w=0; while [ ! -S $D/net.sock ] && [ $w -lt 100 ]; do usleep 20000; w=$((w+1)); done
printf '%s' "console=ttyS0 quiet panic=-1 mitigations=off random.trust_cpu=on i8042.noaux clade.token=$T clade.id=root clade.hostname=root clade.net=10.99.0.1/24,10.99.0.2,10.99.0.2" > $D/cmdline
$VMM run --socket $D/root.sock --agent-socket $D/root.agent --serial-log $D/root.serial --mem-mib 512 \
  --kernel /opt/img/vmlinux --initramfs /opt/img/initramfs.cpio --cmdline-fd 3 --net $D/net.sock 3< $D/cmdline \
  > $D/root.out 2>&1 &
ROOT=$!
w=0; while [ ! -S $D/root.agent -o ! -S $D/root.sock ] && [ $w -lt 250 ]; do usleep 20000; w=$((w+1)); done
out=$($A hello $D/root.agent $T 90000 2>&1)
check hello "$(echo "$out" | cut -c1-8)" "hello ok"
check status-net "$($A ctl $D/root.sock status | grep -o '"netConnected":true')" '"netConnected":true'
check mac "$($A exec $D/root.agent $T 'cat /sys/class/net/eth0/address')" "52:54:00:c1:ad:0f"
# clade.net on the command line: the agent loads virtio-net, brings eth0 up and addresses it.
check carrier "$($A exec $D/root.agent $T 'cat /sys/class/net/eth0/carrier')" "1"
# Any packet to the gateway starts with an ARP request: frames out of the guest.
$A exec $D/root.agent $T '(ping -c 2 -W 1 10.99.0.2 || busybox ping -c 2 -W 1 10.99.0.2 || python3 -c "import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); [s.sendto(b\"x\", (\"10.99.0.2\", 9)) for _ in range(3)]") >/dev/null 2>&1; sleep 1; true'
tx=$($A exec $D/root.agent $T 'cat /sys/class/net/eth0/statistics/tx_packets')
rx=$($A exec $D/root.agent $T 'cat /sys/class/net/eth0/statistics/rx_packets')
echo "guest eth0: tx_packets $tx rx_packets $rx"
check guest-sent "$([ "${tx:-0}" -ge 1 ] && echo yes)" "yes"
check guest-received "$([ "${rx:-0}" -ge 1 ] && echo yes)" "yes"
$A ctl $D/root.sock status; echo

$A netsink $D/child/net.sock 60 > $D/child.net 2>&1 &
CSINK=$!
w=0; while [ ! -S $D/child/net.sock ] && [ $w -lt 100 ]; do usleep 20000; w=$((w+1)); done
check forks-needs-dirs "$($A ctl $D/root.sock 'forks 1' | grep -o 'has a network')" "has a network"
$A ctl $D/root.sock "forks 1 $D/child"; echo
sleep 2
st=$($A ctl $D/child/control.sock status)
echo "$st"
check child-net "$(echo "$st" | grep -o "\"net\":\"$D/child/net.sock\",\"netConnected\":true")" "\"net\":\"$D/child/net.sock\",\"netConnected\":true"
check child-agent "$($A exec $D/child/agent.sock $T 'cat /sys/class/net/eth0/carrier')" "1"
check parent-net "$($A ctl $D/root.sock status | grep -o '"netConnected":true')" '"netConnected":true'
$A ctl $D/child/control.sock quit > /dev/null
# A snapshot records the NIC: a start without --net is refused (exit 2), one with it connects and the guest's
# eth0 is still up.
mkdir -p $D/snap
$A ctl $D/root.sock "snapshot $D/snap" > /dev/null
w=0; while [ ! -f $D/snap/done ] && [ $w -lt 500 ]; do usleep 20000; w=$((w+1)); done
check snapshot-written "$(grep -o '"ok":true' $D/snap/done)" '"ok":true'
$VMM run --socket $D/nonet.sock --restore $D/snap > $D/nonet.out 2>&1
check restore-needs-net "$?:$(grep -c 'has a network' $D/nonet.out)" "2:1"
$A netsink $D/restored-net.sock 60 > $D/restored.net 2>&1 &
RSINK=$!
w=0; while [ ! -S $D/restored-net.sock ] && [ $w -lt 100 ]; do usleep 20000; w=$((w+1)); done
$VMM run --socket $D/restored.sock --agent-socket $D/restored.agent --restore $D/snap --net $D/restored-net.sock > $D/restored.out 2>&1 &
RESTORED=$!
# Both sockets: the agent's may be bound before the control socket, and a loaded runner restores slowly.
w=0; while { [ ! -S $D/restored.agent ] || [ ! -S $D/restored.sock ]; } && [ $w -lt 750 ]; do usleep 20000; w=$((w+1)); done
check restored-net "$($A ctl $D/restored.sock status | grep -o '"netConnected":true')" '"netConnected":true'
check restored-carrier "$($A exec $D/restored.agent $T 'cat /sys/class/net/eth0/carrier')" "1"
$A ctl $D/restored.sock quit > /dev/null
wait $RESTORED
kill $RSINK 2>/dev/null
wait $RSINK 2>/dev/null
$A ctl $D/root.sock quit > /dev/null
wait $ROOT
sleep 1
kill $SINK $CSINK 2>/dev/null
wait $SINK $CSINK 2>/dev/null
echo "root sink: $(cat $D/root.net)"
echo "child sink: $(cat $D/child.net)"
check root-sink-frames "$(grep -c 'netsink: [1-9][0-9]* frames' $D/root.net)" "1"
tail -n 5 $D/root.out
echo done
