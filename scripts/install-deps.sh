#!/usr/bin/env bash
# Installs the Debian packages the tests and benchmarks drive drivetap with, if any is missing.
# Safe to run again: it does nothing when everything is there. Uses sudo when not root.
set -euo pipefail
# The guest tests (test/interop/guest.test.ts, scripts/guest-image.sh) boot a Debian kernel under QEMU
# with busybox, e2fsprogs, fstrim (util-linux) and fio in its initramfs.
# openssl makes the TLS tests' certificates (test/helpers/tls-client-certs.ts).
PACKAGES=(qemu-utils libnbd-bin python3-libnbd fio nbdkit fuse3 e2fsprogs mount chromium iproute2
  qemu-system-x86 busybox-static util-linux openssl)
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# qemu-storage-daemon (the mirror benchmark's reference) comes with qemu-system-common.
command -v qemu-storage-daemon >/dev/null || missing+=(qemu-system-common)
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
echo "install-deps: installing ${missing[*]}"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
