#!/usr/bin/env bash
# mkfs speed, side by side: `folio mkfs` and `mkfs.ext4` (defaults) on
# fresh sparse files of each size, RUNS times each in turn; prints the
# median wall time of each and the ratio folio/mke2fs, and e2fsck's
# verdict on folio's last image.
#
#   bash bench/mkfs.sh            # SIZES="1T" RUNS=5
#   SIZES="64G 1T 16T" RUNS=7 bash bench/mkfs.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:/sbin:/usr/sbin"
SIZES="${SIZES:-1T}"
RUNS="${RUNS:-5}"
DIR="${DIR:-/tmp}"
cargo build --release -q -p folio-cli
folio="$PWD/target/release/folio"
img="$DIR/folio-mkfs-bench.img"

median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
timed() {
    local s e
    rm -f "$img"
    s=$(date +%s.%N)
    "$@" >/dev/null 2>&1
    e=$(date +%s.%N)
    awk -v s="$s" -v e="$e" 'BEGIN {printf "%.4f\n", e - s}'
}

printf "%-6s %12s %12s %8s  %s\n" size "folio (s)" "mke2fs (s)" ratio e2fsck
for size in $SIZES; do
    f=() m=()
    for _ in $(seq "$RUNS"); do
        f+=("$(timed "$folio" mkfs -q "$img" "$size")")
        m+=("$(timed mkfs.ext4 -q -F "$img" "$size")")
    done
    rm -f "$img"
    "$folio" mkfs -q "$img" "$size"
    if e2fsck -fn "$img" >/dev/null 2>&1; then fsck=clean; else fsck=NOT-CLEAN; fi
    fm=$(printf "%s\n" "${f[@]}" | median)
    mm=$(printf "%s\n" "${m[@]}" | median)
    printf "%-6s %12.3f %12.3f %8.2f  %s\n" "$size" "$fm" "$mm" "$(awk -v a="$fm" -v b="$mm" 'BEGIN {print a / b}')" "$fsck"
done
rm -f "$img"
