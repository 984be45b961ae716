#!/usr/bin/env bash
# The main job on a built-in default: make a demo ext4 image with folio and
# mount it through FUSE on ./folio-demo. Installs fuse3 (fusermount3) if
# missing.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v fusermount3 >/dev/null 2>&1; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq fuse3 >/dev/null
fi
cargo build --release -q -p folio-cli
folio=./target/release/folio
if grep -q " $(pwd)/folio-demo fuse" /proc/mounts 2>/dev/null; then
    echo "folio-demo is already mounted."
else
    # With no arguments: make folio-demo.img (if absent) and mount it.
    "$folio" mount
fi
echo
ls -la folio-demo
echo
echo "Try: cat folio-demo/hello.txt; cp -r /etc folio-demo/; df -h folio-demo"
echo "Unmount with: $folio umount folio-demo   (then: e2fsck -fn folio-demo.img)"
