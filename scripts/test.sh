#!/usr/bin/env bash
# Run every folio test. Installs the system tools the tests use (e2fsprogs
# for mkfs.ext4/e2fsck/debugfs, util-linux for mount/losetup, fuse3 for
# fusermount3, acl for setfacl/getfacl, fsverity (fsverity-utils) for
# fs-verity digests, and the NBD peers: qemu-utils for qemu-img/qemu-io/qemu-nbd,
# libnbd-bin for nbdinfo/nbdcopy, nbdkit) when missing.
# Tests that need root or loop devices skip outside CI and run under CI=true.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
for tool in mkfs.ext4 e2fsck debugfs; do
    command -v "$tool" >/dev/null 2>&1 || [ -x "/sbin/$tool" ] || need+=(e2fsprogs)
done
command -v losetup >/dev/null 2>&1 || need+=(util-linux mount)
command -v fusermount3 >/dev/null 2>&1 || need+=(fuse3)
command -v setfacl >/dev/null 2>&1 || need+=(acl)
command -v fsverity >/dev/null 2>&1 || need+=(fsverity)
for pair in qemu-io:qemu-utils qemu-nbd:qemu-utils nbdinfo:libnbd-bin nbdcopy:libnbd-bin nbdkit:nbdkit; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || need+=("${pair##*:}")
done
if [ ${#need[@]} -gt 0 ]; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    echo "Installing: ${need[*]}"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
fi
export PATH="$PATH:/sbin:/usr/sbin"

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --all-targets -- -D warnings
echo "== cargo test"
cargo test --workspace
echo "== fuzz (coverage-guided, bounded: FOLIO_FUZZ_SECONDS per target)"
bash fuzz/run.sh "${FOLIO_FUZZ_SECONDS:-15}"
