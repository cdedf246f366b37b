#!/bin/busybox sh
# /init of the guest-test initramfs (scripts/guest-image.sh packs it), run as PID 1 by busybox sh.
# It exercises the disk at /dev/vda, which the host serves through drivetap: ext4 is made, filled with
# files of known content, half of them are deleted and fstrim discards the freed space, fio writes 4 KiB
# at random at iodepth 32 with crc32c verification, then the filesystem is checked and the kept files'
# checksums are compared after a remount. Each step prints a "DRIVETAP-GUEST: step NAME" marker, and a
# heartbeat every 2 s shows the guest's own view of the disk (requests in flight, completed I/O), so a
# host that sees no progress can tell whether the guest still has requests outstanding. The last
# marker is "DRIVETAP-GUEST: result ok" or "DRIVETAP-GUEST: result fail REASON"; then the guest powers
# off. If this script dies instead, the kernel panics and, with panic=-1 and -no-reboot, QEMU exits
# without a result marker.
#
# Parameters come from the kernel command line: drivetap.fill_mib (data written as files, default 64),
# drivetap.fio_seconds (default 5), drivetap.fio_mib (the fio file's size, default 64).

/bin/busybox mkdir -p /proc /sys /dev /mnt /tmp /bin /sbin
/bin/busybox --install -s /bin
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null

say() { echo "DRIVETAP-GUEST: $*"; }
finish() {
  say "result $*"
  sync
  poweroff -f
  # poweroff -f does not return; if it ever did, the kernel panics when PID 1 exits.
  exit 1
}
fail() { finish "fail $*"; }

fill_mib=64
fio_seconds=5
fio_mib=64
for word in $(cat /proc/cmdline); do
  case "$word" in
    drivetap.fill_mib=*) fill_mib=${word#*=} ;;
    drivetap.fio_seconds=*) fio_seconds=${word#*=} ;;
    drivetap.fio_mib=*) fio_mib=${word#*=} ;;
  esac
done
say "step boot kernel $(uname -r) fill_mib=$fill_mib fio_seconds=$fio_seconds fio_mib=$fio_mib"

# Modules, in the order guest-image.sh resolved from modules.dep: "req PATH" must load; "opt PATH" is a
# soft dependency with alternatives (crc32c_intel needs SSE4.2, crc32c_generic does not).
while read -r kind path; do
  if ! out=$(insmod "/lib/modules/$(uname -r)/$path" 2>&1); then
    case "$out" in *"File exists"*) continue ;; esac
    if [ "$kind" = req ]; then fail "insmod $path: $out"; fi
    say "optional module $path not loaded: $out"
  fi
done </etc/drivetap-modules

# The disk appears once virtio-pci has probed the device; this polls the guest's own device list.
i=0
while [ ! -b /dev/vda ]; do
  i=$((i + 1))
  [ $i -le 100 ] || fail "no /dev/vda after 10 s"
  sleep 0.1
done
say "step disk $(cat /sys/block/vda/size) sectors, discard_max_bytes $(cat /sys/block/vda/queue/discard_max_bytes)"

# Heartbeat: the guest's view of /dev/vda. inflight = reads writes the guest has submitted and not had
# answered; stat = the block layer's counters (reads, merges, sectors, ms, writes, ...).
(
  while :; do
    # Unquoted on purpose: the files pad their columns with runs of spaces.
    say "hb uptime $(cut -d' ' -f1 /proc/uptime) inflight $(echo $(cat /sys/block/vda/inflight))" \
      "stat $(echo $(cat /sys/block/vda/stat))"
    sleep 2
  done
) &

say "step mkfs"
mkfs.ext4 -F -q /dev/vda || fail "mkfs.ext4"
mount -t ext4 /dev/vda /mnt || fail "mount"

say "step fill"
# Files of known content: patterned ones (their content follows from their name) and random ones (their
# checksum is recorded). Odd-numbered files are deleted afterwards, so their blocks are what fstrim frees.
files=$((fill_mib / 4))
n=1
while [ $n -le $files ]; do
  if [ $((n % 4)) -lt 2 ]; then
    yes "drivetap guest file $n" | head -c 4194304 >/mnt/f$n || fail "write f$n"
  else
    head -c 4194304 /dev/urandom >/mnt/f$n || fail "write f$n"
  fi
  n=$((n + 1))
done
sync
(cd /mnt && sha256sum f* >/tmp/all.sums) || fail "sha256sum"
n=1
while [ $n -le $files ]; do
  rm /mnt/f$n
  n=$((n + 2))
done
grep -E ' f[0-9]*[02468]$' /tmp/all.sums >/tmp/kept.sums
sync

say "step fstrim"
fstrim -v /mnt || fail "fstrim"

say "step fio"
fio --name=guest --filename=/mnt/fio.dat --size=${fio_mib}M --rw=randwrite --bs=4k --iodepth=32 \
  --ioengine=libaio --direct=1 --time_based --runtime=$fio_seconds --verify=crc32c \
  --verify_backlog=1024 --verify_fatal=1 --verify_state_save=0 --output-format=terse \
  --terse-version=3 >/tmp/fio.out 2>&1
rc=$?
# terse v3: field 3 is the job name, 5 the error, 6-9 the read side, 47-50 the write side (KiB, KiB/s, IOPS, ms).
say "fio rc $rc $(cut -d';' -f3,5,6,8,9,47,49,50 /tmp/fio.out | tail -1)"
[ $rc -eq 0 ] || { cat /tmp/fio.out; fail "fio exited $rc"; }

say "step check"
sync
umount /mnt || fail "umount"
e2fsck -fn /dev/vda >/tmp/fsck.out 2>&1
rc=$?
cat /tmp/fsck.out
[ $rc -eq 0 ] || fail "e2fsck -fn exited $rc"
mount -t ext4 -o ro /dev/vda /mnt || fail "remount"
(cd /mnt && sha256sum -c /tmp/kept.sums) >/tmp/sums.out 2>&1 || {
  cat /tmp/sums.out
  fail "kept files changed"
}
umount /mnt || fail "umount after check"
finish ok
