#!/usr/bin/env bash
# kiln set-up: installs the host packages kiln needs and unpacks the guest
# kernel into the data directory. Idempotent: running it again changes
# nothing that is already in place. Never installs from testing.
set -euo pipefail

DATA_DIR="${KILN_DATA_DIR:-/var/lib/kiln}"
for arg in "$@"; do
  case "$arg" in
    --data-dir=*) DATA_DIR="${arg#--data-dir=}" ;;
    *) echo "setup.sh: unknown argument $arg (use --data-dir=DIR)" >&2; exit 2 ;;
  esac
done

log() { echo "setup: $*" >&2; }

if [ "$(id -u)" != 0 ]; then
  echo "setup.sh must run as root (it installs packages)" >&2
  exit 1
fi

# The Debian mirror is read from the machine's own apt sources, so the
# backports suite comes from the same place as everything else.
debian_mirror() {
  local f
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    awk '
      /^[[:space:]]*$/ { if (uri != "" && suites ~ /(^| )bookworm( |$)/) { print uri; exit } uri=""; suites=""; next }
      /^URIs:/ { uri=$2 }
      /^Suites:/ { $1=""; suites=$0 " " }
      END { if (uri != "" && suites ~ /(^| )bookworm( |$)/) print uri }
    ' "$f"
  done
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [ -f "$f" ] || continue
    awk '$1=="deb" && $3=="bookworm" { print $2 }' "$f"
  done
}

BACKPORTS=/etc/apt/sources.list.d/kiln-bookworm-backports.sources
if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
  MIRROR="$(debian_mirror | head -n1)"
  if [ -z "$MIRROR" ]; then
    echo "setup.sh: no bookworm entry found in /etc/apt/sources.list*; add your Debian mirror first" >&2
    exit 1
  fi
  log "enabling bookworm-backports from $MIRROR"
  cat >"$BACKPORTS" <<SRC
Types: deb
URIs: $MIRROR
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
  rm -f /var/lib/kiln-setup.apt-updated
fi

need_pkgs=()
qemu_ok() {
  command -v qemu-system-x86_64 >/dev/null && command -v qemu-img >/dev/null &&
    qemu-system-x86_64 --version | head -n1 | grep -Eq 'version (1[0-9])\.'
}
qemu_ok || need_pkgs+=(qemu)
for bin in mkfs.ext4:e2fsprogs debugfs:e2fsprogs fuse2fs:fuse2fs debootstrap:debootstrap nft:nftables ip:iproute2 xz:xz-utils cpio:cpio busybox:busybox-static jq:jq curl:curl docker-registry:docker-registry; do
  command -v "${bin%%:*}" >/dev/null || need_pkgs+=("${bin##*:}")
done

APT_STAMP=/var/lib/kiln-setup.apt-updated
apt_update() {
  local policy
  policy="$(apt-cache policy qemu-system-x86 2>/dev/null || true)"
  if [ ! -f "$APT_STAMP" ] || [[ "$policy" != *bookworm-backports* ]]; then
    log "apt-get update"
    apt-get update -qq
    touch "$APT_STAMP"
  fi
}

if [ "${#need_pkgs[@]}" -gt 0 ]; then
  apt_update
  export DEBIAN_FRONTEND=noninteractive
  pkgs=()
  for p in "${need_pkgs[@]}"; do
    if [ "$p" = qemu ]; then
      qemu_from_backports=1
    else
      pkgs+=("$p")
    fi
  done
  if [ "${#pkgs[@]}" -gt 0 ]; then
    log "installing ${pkgs[*]}"
    apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null
  fi
  if [ -n "${qemu_from_backports:-}" ]; then
    # -t lets QEMU's own dependencies (seabios, qemu-system-data) come from
    # backports too; everything else stays on bookworm.
    log "installing qemu-system-x86 qemu-utils from bookworm-backports"
    apt-get install -y -qq --no-install-recommends -t bookworm-backports qemu-system-x86 qemu-utils >/dev/null
  fi
fi
qemu_ok || { echo "setup.sh: QEMU 10.x not available after install" >&2; exit 1; }

# Image builds read and edit the disks of build VMs through fuse2fs.
if [ ! -e /dev/fuse ]; then
  modprobe fuse 2>/dev/null || true
  [ -e /dev/fuse ] || { echo "setup.sh: /dev/fuse is missing (image builds mount disks with fuse2fs); load the fuse module" >&2; exit 1; }
fi

# The SDK compatibility tests drive the official JavaScript client.
if ! command -v npm >/dev/null; then
  apt_update
  log "installing nodejs npm"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null
fi

# The web console's browser test drives Debian's Chromium and Firefox ESR
# (headless; Firefox over WebDriver BiDi, which it speaks natively).
if ! command -v chromium >/dev/null; then
  apt_update
  log "installing chromium"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null
fi
if ! command -v firefox-esr >/dev/null; then
  apt_update
  log "installing firefox-esr"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends firefox-esr >/dev/null
fi

# Installs packages whose postinst would start a system service, with
# those starts refused (a policy-rc.d, unless the machine has its own).
install_without_starting() {
  local own_policy="" rc=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    own_policy=1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null || rc=$?
  if [ -n "$own_policy" ]; then rm -f /usr/sbin/policy-rc.d; fi
  return "$rc"
}

# The PostgreSQL store's tests (and `kiln bench api --store postgres`)
# start a private cluster of their own from Debian's postgresql-15 binaries,
# as the postgres user, on a unix socket in a temporary folder. The
# package's own cluster (15/main) is not kiln's: it is installed with
# service starts refused (policy-rc.d), set to start manually, and stopped
# if it runs; it is kept, not dropped, since it may hold someone's data.
if [ ! -x /usr/lib/postgresql/15/bin/postgres ]; then
  apt_update
  log "installing postgresql-15"
  install_without_starting postgresql-15
  if [ -f /etc/postgresql/15/main/start.conf ]; then
    echo manual >/etc/postgresql/15/main/start.conf
  fi
fi
if command -v pg_lsclusters >/dev/null && pg_lsclusters -h 2>/dev/null | awk '$1 == 15 && $2 == "main" && $4 == "online"' | grep -q .; then
  log "stopping the postgresql-15 package's own cluster (kiln's tests run their own)"
  pg_ctlcluster 15 main stop || true
fi
[ -x /usr/lib/postgresql/15/bin/initdb ] || { echo "setup.sh: postgresql-15 not available after install" >&2; exit 1; }

# `kiln bench proxy` measures kiln's endpoint proxy against nginx, the
# peer a user would otherwise put in front of an app. Debian's `nginx`
# package is the binary with the ssl and http2 modules (nginx-light only
# adds a module on top). The benchmark starts its own nginx on loopback
# with a config of its own, so the system service must never run: the
# package's postinst may not start it, and it is disabled and stopped on
# every run.
if ! command -v nginx >/dev/null && [ ! -x /usr/sbin/nginx ]; then
  apt_update
  log "installing nginx (for kiln bench proxy; the system service stays off)"
  install_without_starting nginx || { echo "setup.sh: installing nginx failed" >&2; exit 1; }
fi
if [ -d /run/systemd/system ]; then
  systemctl disable --now nginx.service >/dev/null 2>&1 || true
else
  update-rc.d nginx disable >/dev/null 2>&1 || true
  if [ -f /run/nginx.pid ]; then /usr/sbin/nginx -s quit 2>/dev/null || true; fi
fi
/usr/sbin/nginx -V 2>&1 | grep -q -- '--with-http_v2_module' || { echo "setup.sh: nginx lacks http_v2 (kiln bench proxy needs it)" >&2; exit 1; }

# The s3:// code artifact tests run a real S3-compatible server, versitygw
# (Apache-2.0, a Go module), with its posix backend in a temporary folder.
VERSITYGW_VERSION=v1.8.0
GO="$(command -v go || echo /usr/local/go/bin/go)"
# `versitygw --version` of a `go install` build says "git": the module
# version is read from the binary's build information instead.
versitygw_ok() {
  local bin
  bin="$(command -v versitygw)" || return 1
  "$GO" version -m "$bin" 2>/dev/null | grep -Eq "^[[:space:]]+mod[[:space:]]+github.com/versity/versitygw[[:space:]]+$VERSITYGW_VERSION([[:space:]]|$)"
}
if ! versitygw_ok; then
  [ -x "$GO" ] || { echo "setup.sh: go is needed to install versitygw (the S3 server of the tests)" >&2; exit 1; }
  log "installing versitygw $VERSITYGW_VERSION into /usr/local/bin"
  GOBIN=/usr/local/bin GOFLAGS=-mod=mod "$GO" install "github.com/versity/versitygw/cmd/versitygw@$VERSITYGW_VERSION"
  versitygw_ok || { echo "setup.sh: versitygw $VERSITYGW_VERSION not available after install" >&2; exit 1; }
fi

# DATA_DIR holds kiln.db, the sealing key and the access keys: only root
# may enter it (kiln enforces the same modes at every start).
install -d -m 0700 "$DATA_DIR"
chmod 0700 "$DATA_DIR"
for f in kiln.db kiln.db-wal kiln.db-shm credentials secrets.key token.key tls/ca.key tls/leaf.key; do
  [ -f "$DATA_DIR/$f" ] && chmod 0600 "$DATA_DIR/$f"
done
[ -d "$DATA_DIR/tls" ] && chmod 0700 "$DATA_DIR/tls"

# Guest kernel: Debian's cloud kernel from bookworm-backports, downloaded
# with apt-get download and unpacked; never committed.
KDIR="$DATA_DIR/kernel"
if [ ! -f "$KDIR/vmlinuz" ] || [ ! -f "$KDIR/modules.list" ]; then
  apt_update
  meta=linux-image-cloud-amd64
  real="$(apt-cache depends -t bookworm-backports "$meta" 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')"
  if [ -z "$real" ]; then
    echo "setup.sh: cannot resolve $meta in bookworm-backports" >&2
    exit 1
  fi
  tmp="$(mktemp -d)"
  chmod 755 "$tmp" # apt-get download drops privileges to _apt
  trap 'rm -rf "$tmp"' EXIT
  log "downloading $real"
  (cd "$tmp" && apt-get download -qq -t bookworm-backports "$real" >/dev/null)
  dpkg-deb -x "$tmp"/*.deb "$tmp/root"
  kver="$(ls "$tmp/root/lib/modules" | head -n1)"
  mkdir -p "$KDIR.new/modules"
  cp "$tmp/root/boot/vmlinuz-$kver" "$KDIR.new/vmlinuz"
  # The modules the guest needs, in load order (dependencies first).
  : >"$KDIR.new/modules.list"
  for m in virtio_mmio virtio_blk failover net_failover virtio_net vsock vmw_vsock_virtio_transport_common vmw_vsock_virtio_transport; do
    p="$(find "$tmp/root/lib/modules/$kver" -name "$m.ko*" | head -n1)"
    [ -n "$p" ] || continue
    out="$KDIR.new/modules/$m.ko"
    case "$p" in
      *.xz) xz -dc "$p" >"$out" ;;
      *.zst) zstd -dc "$p" >"$out" ;;
      *) cp "$p" "$out" ;;
    esac
    echo "$m.ko" >>"$KDIR.new/modules.list"
  done
  echo "$kver" >"$KDIR.new/version"
  rm -rf "$KDIR"
  mv "$KDIR.new" "$KDIR"
  log "kernel $kver in $KDIR"
fi
log "ok: QEMU $(qemu-system-x86_64 --version | head -n1 | awk '{print $4}'), kernel $(cat "$KDIR/version") in $KDIR"
