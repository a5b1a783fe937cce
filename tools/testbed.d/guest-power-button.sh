#!/bin/sh
# Run by busybox acpid in the default test guest when the ACPI power button is pressed: a
# clean shutdown, as a distribution's acpid or systemd-logind would do.
exec >/dev/console 2>&1
echo "ferro-guest: power button"
sync
stty "$(stty -g </dev/console)" </dev/console 2>/dev/null  # drain the console
poweroff -f
