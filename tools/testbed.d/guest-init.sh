#!/bin/sh
# init of Ferro's default test guest (busybox). Loads the kernel's virtio, ACPI button and
# evdev modules, switches to a root file system on disk if asked (ferro.root=), starts acpid (the power button shuts down), says it is ready, runs the
# command given as ferro.run="..." on the kernel command line, powers off.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /tmp /run
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /tmp
while read -r module; do
    # After a switch to a root file system on disk, the modules are loaded already.
    [ -d "/sys/module/$(basename "$module" .ko | tr - _)" ] && continue
    insmod "/lib/modules/$module" || echo "ferro-guest: cannot load $module"
done < /etc/modules-order
# ferro.root=DEVICE: the same files on an ext4 disk (tools/testbed's rootfs.ext4) become the
# root file system, and this init runs again from there.
root=$(tr ' ' '\n' < /proc/cmdline | sed -n 's/^ferro\.root=//p')
if [ -n "$root" ] && [ ! -e /etc/ferro-rootfs ]; then
    mkdir -p /newroot
    if mount -t ext4 "$root" /newroot; then
        umount /dev/pts /tmp
        exec switch_root /newroot /init
    fi
    echo "ferro-guest: cannot mount $root as the root file system"
fi
# With console=hvc0 the console only exists once virtio_console is loaded: reopen it.
exec </dev/console >/dev/console 2>&1
# The ACPI power button shuts the guest down (/etc/acpi/PWRF/00000080).
acpid -c /etc/acpi -l /dev/null
echo "ferro-guest: ready"
cmd=$(sed -n 's/.*ferro\.run="\([^"]*\)".*/\1/p' /proc/cmdline)
if [ -z "$cmd" ]; then
    cmd=$(tr ' ' '\n' < /proc/cmdline | sed -n 's/^ferro\.run=//p')
fi
# Waits until everything written to the console has been sent (tcsetattr with TCSADRAIN).
drain='stty "$(stty -g)" 2>/dev/null'
if [ -n "$cmd" ]; then
    # The console becomes the controlling terminal, so `ferro.run=sh` is a usable shell. Its
    # session ends with a hangup that discards unsent output, so drain before leaving.
    setsid cttyhack sh -c "$cmd"'
rc=$?; '"$drain"'; exit $rc'
    echo "ferro-guest: exit $?"
fi
sync
eval "$drain"
poweroff -f
