#!/usr/bin/env bash
# Builds the `matrix-crew:local` image from this checkout without pulling anything.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --bin crew
binary=${CARGO_TARGET_DIR:-target}/release/crew
rootfs=docker/rootfs
rm -rf "$rootfs"
mkdir -p "$rootfs/usr/local/bin" "$rootfs/etc/ssl/certs" "$rootfs/tmp" "$rootfs/data"
cp "$binary" "$rootfs/usr/local/bin/crew"
# The dynamic loader and every library the binary links, at their own paths.
for lib in $(ldd "$binary" | grep -o '/[^ ]*'); do
  mkdir -p "$rootfs$(dirname "$lib")"
  cp -L "$lib" "$rootfs$lib"
done
cp -L /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/" 2>/dev/null || true
docker build -t matrix-crew:local -f docker/Dockerfile docker
echo "built matrix-crew:local"
