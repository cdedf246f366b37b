#!/usr/bin/env bash
# Builds what the guest tests boot: the current Debian kernel (linux-image-amd64's dependency,
# downloaded with apt-get download and unpacked with dpkg-deb -x: nothing is installed) and an
# uncompressed initramfs holding busybox-static, the kernel modules virtio_blk, virtio_pci and ext4
# need (resolved through modules.dep and the modules' soft dependencies), mkfs.ext4, e2fsck, fstrim
# and fio with the shared libraries ldd lists, and scripts/guest-init.sh as /init.
#
# The result is cached in $DRIVETAP_GUEST_CACHE (default /var/cache/drivetap-guest), keyed by kernel
# version and by a hash of this script, the init script and the host tools, and reused when present.
# Prints "kernel=PATH", "initrd=PATH" and "kver=VERSION" on stdout; progress goes to stderr. Needs root
# (device nodes in the initramfs) and the packages scripts/install-deps.sh installs. Safe to run
# concurrently: builds are serialised by a lock in the cache directory.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
CACHE=${DRIVETAP_GUEST_CACHE:-/var/cache/drivetap-guest}
MODULES_WANTED=(virtio_pci virtio_blk ext4)
log() { echo "guest-image: $*" >&2; }
die() {
  log "$*"
  exit 1
}

# Every tool is required: a missing one is an error naming its Debian package, never a skip.
need() { command -v "$1" >/dev/null || die "required tool $1 is missing (Debian package $2)"; }
need busybox busybox-static
need mkfs.ext4 e2fsprogs
need e2fsck e2fsprogs
need fstrim util-linux
need fio fio
need flock util-linux
need ldd libc-bin
need apt-get apt
need apt-cache apt
need dpkg-deb dpkg
need sha256sum coreutils
[ "$(id -u)" -eq 0 ] || die "must run as root (it creates device nodes for the initramfs)"
[ -f "$HERE/guest-init.sh" ] || die "missing $HERE/guest-init.sh"

mkdir -p "$CACHE"
exec 9>"$CACHE/.lock"
flock 9

# The kernel package linux-image-amd64 currently points at (an apt-get update if the lists are empty).
kernel_package() {
  apt-cache depends linux-image-amd64 2>/dev/null |
    awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ { print $2; exit }'
}
pkg=$(kernel_package)
if [ -z "$pkg" ]; then
  log "no linux-image-amd64 in the apt lists; running apt-get update"
  apt-get update -qq >&2
  pkg=$(kernel_package)
fi
[ -n "$pkg" ] || die "apt-cache depends linux-image-amd64 names no kernel package"
kver=${pkg#linux-image-}

tool_hash=$(
  {
    cat "$0" "$HERE/guest-init.sh"
    for t in busybox mkfs.ext4 e2fsck fstrim fio; do sha256sum "$(readlink -f "$(command -v "$t")")"; done
  } | sha256sum | cut -c1-16
)
kdir="$CACHE/$kver"
kernel="$kdir/vmlinuz"
initrd="$kdir/initramfs-$tool_hash.cpio"
if [ -f "$kernel" ] && [ -f "$initrd" ]; then
  printf 'kernel=%s\ninitrd=%s\nkver=%s\n' "$kernel" "$initrd" "$kver"
  exit 0
fi

work=$(mktemp -d "$CACHE/build.XXXXXX")
trap 'rm -rf "$work"' EXIT
mkdir -p "$kdir"

# ---- the kernel package: download once per version, unpack, index the modules ---------------------
deb=$(find "$kdir" -maxdepth 1 -name "${pkg}_*.deb" | head -1)
if [ -z "$deb" ]; then
  log "downloading $pkg"
  # apt-get download runs as the _apt user where it can write; otherwise it warns and runs as root.
  chown _apt "$work" 2>/dev/null || true
  (cd "$work" && apt-get download -q "$pkg" >&2)
  mv "$work"/"${pkg}"_*.deb "$kdir/"
  deb=$(find "$kdir" -maxdepth 1 -name "${pkg}_*.deb" | head -1)
fi
log "unpacking $(basename "$deb")"
dpkg-deb -x "$deb" "$work/deb"
moddir="$work/deb/lib/modules/$kver"
if [ ! -d "$moddir" ] && [ -d "$work/deb/usr/lib/modules/$kver" ]; then
  mkdir -p "$work/deb/lib/modules"
  mv "$work/deb/usr/lib/modules/$kver" "$moddir"
fi
[ -d "$moddir" ] || die "$deb holds no lib/modules/$kver"
vmlinuz="$work/deb/boot/vmlinuz-$kver"
[ -f "$vmlinuz" ] || die "$deb holds no boot/vmlinuz-$kver"
# The package leaves modules.dep to its postinst (depmod); generate it in the unpacked tree instead.
if [ ! -f "$moddir/modules.dep" ]; then
  if command -v depmod >/dev/null; then
    depmod -b "$work/deb" "$kver"
  else
    busybox depmod -b "$work/deb" "$kver"
  fi
fi
[ -s "$moddir/modules.dep" ] || die "depmod wrote no modules.dep"

# ---- module resolution -------------------------------------------------------------------------------
# A module's name is its file name without .ko[.xz|.zst|.gz], with - read as _ (as modprobe does).
declare -A dep_of=() path_of=() builtin=() aliases=() emitted=()
modname() {
  local b=${1##*/}
  b=${b%%.ko*}
  echo "${b//-/_}"
}
while IFS= read -r line; do
  path=${line%%:*}
  name=$(modname "$path")
  path_of[$name]=$path
  dep_of[$path]=${line#*:}
done <"$moddir/modules.dep"
if [ -f "$moddir/modules.builtin" ]; then
  while IFS= read -r path; do builtin[$(modname "$path")]=1; done <"$moddir/modules.builtin"
fi
if [ -f "$moddir/modules.alias" ]; then
  while read -r word alias target; do
    [ "$word" = alias ] || continue
    aliases[$alias]+=" ${target//-/_}"
  done <"$moddir/modules.alias"
fi

# The text of a module file (decompressed) on stdout.
module_text() {
  case "$1" in
    *.xz) xz -dc "$moddir/$1" ;;
    *.zst) zstd -dcq "$moddir/$1" ;;
    *.gz) gzip -dc "$moddir/$1" ;;
    *) cat "$moddir/$1" ;;
  esac
}

# Modules a name stands for: itself, else what the alias names (several: each is an alternative).
resolve() {
  local n=${1//-/_}
  if [ -n "${builtin[$n]:-}" ]; then return; fi
  if [ -n "${path_of[$n]:-}" ]; then
    echo "$n"
  elif [ -n "${aliases[$1]:-}" ]; then
    local m
    for m in ${aliases[$1]}; do
      [ -n "${builtin[$m]:-}" ] && return
    done
    for m in ${aliases[$1]}; do [ -n "${path_of[$m]:-}" ] && echo "$m"; done
  fi
}

# Appends NAME's load order to $load_list: its soft "pre:" dependencies (optional), its hard
# dependencies from modules.dep (each resolved recursively), itself, then its "post:" soft dependencies.
load_list=()
add_module() {
  local name=$1 kind=$2
  [ -n "${builtin[$name]:-}" ] && return
  local path=${path_of[$name]:-}
  [ -n "$path" ] || die "module $name is neither in modules.dep nor built in"
  [ -n "${emitted[$name]:-}" ] && return
  emitted[$name]=1
  local softdep pre="" post="" word mode="" d
  softdep=$(module_text "$path" | tr '\0' '\n' | sed -n 's/^softdep=//p')
  for word in $softdep; do
    case "$word" in
      pre:) mode=pre ;;
      post:) mode=post ;;
      *) if [ "$mode" = pre ]; then pre+=" $word"; else post+=" $word"; fi ;;
    esac
  done
  for word in $pre; do for d in $(resolve "$word"); do add_module "$d" opt; done; done
  for d in ${dep_of[$path]}; do add_module "$(modname "$d")" "$kind"; done
  load_list+=("$kind $path")
  for word in $post; do for d in $(resolve "$word"); do add_module "$d" opt; done; done
}
for m in "${MODULES_WANTED[@]}"; do add_module "$m" req; done
log "modules: $(printf '%s, ' "${load_list[@]}")"

# ---- the initramfs -------------------------------------------------------------------------------------
root="$work/root"
mkdir -p "$root"/{bin,sbin,etc,proc,sys,dev,mnt,tmp,usr/bin,usr/sbin} "$root/lib/modules/$kver"
install -m 0755 "$(readlink -f "$(command -v busybox)")" "$root/bin/busybox"
install -m 0755 "$HERE/guest-init.sh" "$root/init"
mknod -m 600 "$root/dev/console" c 5 1
mknod -m 666 "$root/dev/null" c 1 3
: >"$root/etc/drivetap-modules"
for entry in "${load_list[@]}"; do
  path=${entry#* }
  out=${path%.xz}
  out=${out%.zst}
  out=${out%.gz}
  mkdir -p "$(dirname "$root/lib/modules/$kver/$out")"
  module_text "$path" >"$root/lib/modules/$kver/$out"
  echo "${entry%% *} $out" >>"$root/etc/drivetap-modules"
done

# The tools and every shared library they load, at the paths the dynamic loader looks in.
copy_with_libs() {
  local bin=$1 dest=$2 lib
  install -D -m 0755 "$(readlink -f "$bin")" "$root$dest"
  if ldd "$bin" | grep -q 'not found'; then die "$bin: a shared library is missing: $(ldd "$bin" | grep 'not found')"; fi
  for lib in $(ldd "$bin" | awk '/=>/ { print $3 } /^\t\// { print $1 }'); do
    [ -e "$root$lib" ] || install -D -m 0755 "$(readlink -f "$lib")" "$root$lib"
  done
}
copy_with_libs "$(command -v mkfs.ext4)" /usr/sbin/mkfs.ext4
copy_with_libs "$(command -v e2fsck)" /usr/sbin/e2fsck
copy_with_libs "$(command -v fstrim)" /usr/sbin/fstrim
copy_with_libs "$(command -v fio)" /usr/bin/fio
[ -f /etc/mke2fs.conf ] && cp /etc/mke2fs.conf "$root/etc/"
echo "root:x:0:0:root:/:/bin/sh" >"$root/etc/passwd"

log "packing the initramfs ($(du -sh "$root" | cut -f1))"
(cd "$root" && find . | busybox cpio -o -H newc -R 0:0 2>/dev/null) >"$work/initramfs.cpio"
[ -s "$work/initramfs.cpio" ] || die "cpio wrote nothing"
cp "$vmlinuz" "$work/vmlinuz"
mv "$work/vmlinuz" "$kernel"
mv "$work/initramfs.cpio" "$initrd"
# Older initramfs builds of this kernel are superseded.
find "$kdir" -maxdepth 1 -name 'initramfs-*.cpio' ! -path "$initrd" -delete
printf 'kernel=%s\ninitrd=%s\nkver=%s\n' "$kernel" "$initrd" "$kver"
