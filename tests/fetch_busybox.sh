#!/usr/bin/env bash
# Download Debian's busybox-static for amd64 and arm64 and extract each into
# .cache/busybox/<arch>/ under the repository (binary: .cache/busybox/<arch>/bin/busybox).
# Idempotent: an arch whose binary is already there is left alone.
# Exit status: 0 when both binaries are present, 3 when apt is unavailable, 1 otherwise.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cache="${BUSYBOX_CACHE:-$root/.cache/busybox}"
arches=(amd64 arm64)

missing=()
for a in "${arches[@]}"; do
  [ -x "$cache/$a/bin/busybox" ] || missing+=("$a")
done
[ ${#missing[@]} -eq 0 ] && exit 0

if ! command -v apt-get >/dev/null || ! command -v dpkg-deb >/dev/null; then
  echo "fetch_busybox: apt-get/dpkg-deb not available" >&2
  exit 3
fi

mkdir -p "$cache/debs"
cd "$cache/debs"
for a in "${missing[@]}"; do
  if ! ls busybox-static_*_"$a".deb >/dev/null 2>&1; then
    if ! apt-get download -q "busybox-static:$a" >&2; then
      # A foreign arch needs `dpkg --add-architecture` and a fresh package list (root only).
      if [ "$(id -u)" = 0 ] && ! dpkg --print-foreign-architectures | grep -qx "$a" \
         && [ "$a" != "$(dpkg --print-architecture)" ]; then
        dpkg --add-architecture "$a"
        apt-get update -qq >&2
      elif [ "$(id -u)" = 0 ]; then
        apt-get update -qq >&2
      fi
      apt-get download -q "busybox-static:$a" >&2
    fi
  fi
  deb="$(ls busybox-static_*_"$a".deb | head -n1)"
  tmp="$cache/.$a.tmp"
  rm -rf "$tmp"
  dpkg-deb -x "$deb" "$tmp"
  rm -rf "${cache:?}/$a"
  mv "$tmp" "$cache/$a"
  [ -x "$cache/$a/bin/busybox" ] || { echo "fetch_busybox: $deb has no bin/busybox" >&2; exit 1; }
done
