#!/bin/sh
# init of the testbed's outer host: a Linux with real (nested) KVM that runs one command.
# ttyS0: kernel console; ttyS1: the command's stdin/stdout; ttyS2: its stderr; ttyS3: status.
export PATH=/usr/bin:/bin:/usr/sbin:/sbin HOME=/root
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /tmp /run /root /var/tmp
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
while read -r module; do
    insmod "/lib/modules/$module" || echo "testbed: cannot load $module" > /dev/ttyS2
done < /etc/testbed/modules
for tty in /dev/ttyS1 /dev/ttyS2 /dev/ttyS3; do stty -F "$tty" raw -echo; done
echo "started" > /dev/ttyS3
# A heartbeat on the status port: the testbed tool takes silence as a hung outer host.
(while sleep 5; do echo "alive" > /dev/ttyS3; done) &
heartbeat=$!
. /etc/testbed/env
cd /root
if [ "$TESTBED_INTERACTIVE" = 1 ]; then
    sh /etc/testbed/run.sh < /dev/ttyS1 > /dev/ttyS1 2> /dev/ttyS2
else
    sh /etc/testbed/run.sh < /dev/null > /dev/ttyS1 2> /dev/ttyS2
fi
status=$?
kill "$heartbeat"
echo "exit=$status" > /dev/ttyS3
sync
poweroff -f
