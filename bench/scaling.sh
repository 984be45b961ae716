#!/usr/bin/env bash
# Random 4 KiB writes into fresh sparse files of growing size, through
# folio's FUSE mount, fuse2fs and the kernel's ext4 on identical fresh
# images, and memfs (crates/fuse/examples/memfs.rs: an in-memory FUSE
# server configured as folio's mount, the transport's floor), in one run (issue 16: the cost of an allocation must not grow
# with the file). For each size: fio randwrite for SECONDS into a fresh
# file, then random overwrites of the same file for SECONDS (psync,
# end_fsync), then the file's extent count (filefrag; folio's image is
# loop-mounted read-only by the kernel for it, which also checks that the
# kernel reads folio's trees). Every image is e2fsck'd at the end.
# Needs root; installs fio, fuse2fs and fuse3 if missing.
#
#   bash bench/scaling.sh                  # 32M 256M 1G 4G, 8 s each
#   SIZES="32M 1G" SECONDS_EACH=4 bash bench/scaling.sh
#   END_FSYNC=0 bash bench/scaling.sh      # write(2) rates only, no fsync
set -euo pipefail
cd "$(dirname "$0")/.."
SIZES=${SIZES:-32M 256M 1G 4G}
SECONDS_EACH=${SECONDS_EACH:-8}
END_FSYNC=${END_FSYNC:-1}
need=()
command -v fio >/dev/null || need+=(fio)
command -v fuse2fs >/dev/null || need+=(fuse2fs)
command -v fusermount3 >/dev/null || need+=(fuse3)
command -v mkfs.ext4 >/dev/null || need+=(e2fsprogs)
if [ ${#need[@]} -gt 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
[ "$(id -u)" -eq 0 ] || { echo "bench/scaling.sh needs root (loop and FUSE mounts)"; exit 1; }
cargo build --release -q -p folio-cli
cargo build --release -q -p folio-fuse --example memfs
FOLIO=$(pwd)/target/release/folio
MEMFS=$(pwd)/target/release/examples/memfs
W=$(mktemp -d /tmp/folio-scaling.XXXXXX)
cleanup() {
    for m in folio fuse2fs kernel ro memfs; do
        mountpoint -q "$W/$m" 2>/dev/null && { fusermount3 -u "$W/$m" 2>/dev/null || umount "$W/$m"; }
    done
    rm -rf "$W"
}
trap cleanup EXIT
mkfs.ext4 -q -F "$W/base.img" 6G
for m in folio fuse2fs kernel ro memfs; do mkdir -p "$W/$m"; done
for m in folio fuse2fs kernel; do cp --sparse=always "$W/base.img" "$W/$m.img"; done
"$FOLIO" mount "$W/folio.img" "$W/folio" >/dev/null
fuse2fs "$W/fuse2fs.img" "$W/fuse2fs" -o rw >/dev/null
mount -o loop "$W/kernel.img" "$W/kernel"
"$MEMFS" "$W/memfs" & sleep 1

bw() {
    python3 -c 'import json,sys; j=json.load(sys.stdin)["jobs"][0]; print("%.1f" % (j["write"]["bw_bytes"]/1048576))'
}
declare -A R
for size in $SIZES; do
    for m in folio fuse2fs kernel memfs; do
        f="$W/$m/rand-$size"
        truncate -s "$size" "$f"
        for pass in fresh over; do
            out=$(fio --name="$pass" --filename="$f" --rw=randwrite --bs=4k --size="$size" \
                --ioengine=psync --time_based --runtime="$SECONDS_EACH" --end_fsync="$END_FSYNC" \
                --randseed=$([ $pass = fresh ] && echo 1 || echo 2) --output-format=json 2>/dev/null)
            R[$size,$m,$pass]=$(bw <<<"$out")
        done
        echo "$size $m: fresh ${R[$size,$m,fresh]} MiB/s, overwrite ${R[$size,$m,over]} MiB/s" >&2
        # memfs holds its files in memory: free them between sizes.
        [ "$m" = memfs ] && rm -f "$f"
    done
    R[$size,kernel,ext]=$(filefrag "$W/kernel/rand-$size" | sed 's/.*: \([0-9]*\) extents\? found/\1/')
done
"$FOLIO" umount "$W/folio"
fusermount3 -u "$W/fuse2fs"
while pgrep -f "fuse2fs $W/fuse2fs.img" >/dev/null; do sleep 0.1; done
umount "$W/kernel"
fusermount3 -u "$W/memfs"
mount -o loop,ro "$W/folio.img" "$W/ro"
for size in $SIZES; do
    R[$size,folio,ext]=$(filefrag "$W/ro/rand-$size" | sed 's/.*: \([0-9]*\) extents\? found/\1/')
done
umount "$W/ro"

printf "\nrandom 4 KiB writes, MiB/s (fio psync, %s s each, end_fsync=%s)\n" "$SECONDS_EACH" "$END_FSYNC"
printf "%-6s %9s %9s %9s %9s %8s %8s %8s | %9s %9s %9s %8s | %10s %10s %6s\n" size folio fuse2fs kernel memfs f/k f/fuse2fs f/memfs \
    "folio-ow" "fuse2fs" "kernel" f/k "ext-folio" "ext-kernel" ratio
ratio() { python3 -c "print('%.2f' % ($1/$2 if float($2) else 0))"; }
for size in $SIZES; do
    printf "%-6s %9s %9s %9s %9s %8s %8s %8s | %9s %9s %9s %8s | %10s %10s %6s\n" "$size" \
        "${R[$size,folio,fresh]}" "${R[$size,fuse2fs,fresh]}" "${R[$size,kernel,fresh]}" "${R[$size,memfs,fresh]}" \
        "$(ratio "${R[$size,folio,fresh]}" "${R[$size,kernel,fresh]}")" \
        "$(ratio "${R[$size,folio,fresh]}" "${R[$size,fuse2fs,fresh]}")" \
        "$(ratio "${R[$size,folio,fresh]}" "${R[$size,memfs,fresh]}")" \
        "${R[$size,folio,over]}" "${R[$size,fuse2fs,over]}" "${R[$size,kernel,over]}" \
        "$(ratio "${R[$size,folio,over]}" "${R[$size,kernel,over]}")" \
        "${R[$size,folio,ext]}" "${R[$size,kernel,ext]}" \
        "$(ratio "${R[$size,folio,ext]}" "${R[$size,kernel,ext]}")"
done
for m in folio fuse2fs kernel; do
    e2fsck -fn "$W/$m.img" >/dev/null 2>&1 && echo "$m image: e2fsck clean" || echo "$m image: e2fsck NOT clean"
done
