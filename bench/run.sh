#!/usr/bin/env bash
# Benchmark folio's FUSE mount against fuse2fs and the kernel's ext4 on
# identical images, and against memfs (crates/fuse/examples/memfs.rs, an
# in-memory FUSE server configured as folio's mount: the transport's
# ceiling), in one run, and print each result and the ratios
# folio/fuse2fs, folio/kernel and folio/memfs. Needs root (loop and FUSE mounts);
# installs fio, fuse2fs and fuse3 if missing.
#
# Workloads: sequential and random fio jobs (one stream), 4 parallel
# sequential writers, 4 parallel random 4 KiB writers on files of their
# own, small-file metadata from one and from 4 processes, and the latency
# of a cold stat and a cached 4 KiB read while another file fsyncs 256 MiB
# (bench/fsync_latency.py).
#
#   bash bench/run.sh            # default: 2 GiB images, quick workloads
#   SIZE=8G SCALE=4 bash bench/run.sh
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE=${SIZE:-2G}
SCALE=${SCALE:-1}
need=()
command -v fio >/dev/null || need+=(fio)
command -v fuse2fs >/dev/null || need+=(fuse2fs)
command -v fusermount3 >/dev/null || need+=(fuse3)
command -v mkfs.ext4 >/dev/null || need+=(e2fsprogs)
if [ ${#need[@]} -gt 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
[ "$(id -u)" -eq 0 ] || { echo "bench/run.sh needs root (loop and FUSE mounts)"; exit 1; }
cargo build --release -q -p folio-cli
cargo build --release -q -p folio-fuse --example memfs
FOLIO=$(pwd)/target/release/folio
MEMFS=$(pwd)/target/release/examples/memfs
# folio, fuse2fs and the kernel on identical images; memfs (an in-memory
# FUSE server doing no filesystem work, crates/fuse/examples/memfs.rs) is
# the FUSE transport's ceiling.
ALL="folio fuse2fs kernel memfs"
W=$(mktemp -d /tmp/folio-bench.XXXXXX)
cleanup() {
    for m in $ALL; do
        mountpoint -q "$W/$m" 2>/dev/null && { fusermount3 -u "$W/$m" 2>/dev/null || umount "$W/$m"; }
    done
    rm -rf "$W"
}
trap cleanup EXIT
mkfs.ext4 -q -F "$W/base.img" "$SIZE"
for m in folio fuse2fs kernel; do
    cp --sparse=always "$W/base.img" "$W/$m.img"
done
for m in $ALL; do
    mkdir -p "$W/$m"
done
"$FOLIO" mount "$W/folio.img" "$W/folio" >/dev/null
fuse2fs "$W/fuse2fs.img" "$W/fuse2fs" -o rw >/dev/null
mount -o loop "$W/kernel.img" "$W/kernel"
"$MEMFS" "$W/memfs" & sleep 1

drop() { sync; echo 3 > /proc/sys/vm/drop_caches; }
MB=$((256 * SCALE))
# name|fio arguments
WORKLOADS=(
  "seq-write-1M|--rw=write --bs=1M --size=${MB}M --end_fsync=1"
  "seq-read-1M|--rw=read --bs=1M --size=${MB}M"
  "rand-write-4k|--rw=randwrite --bs=4k --size=$((32 * SCALE))M --end_fsync=1"
  "rand-read-4k|--rw=randread --bs=4k --size=$((32 * SCALE))M"
  "parallel-write-4x|--rw=write --bs=256k --size=$((64 * SCALE))M --numjobs=4 --end_fsync=1"
  "rand-write-4x|--rw=randwrite --bs=4k --size=$((128 * SCALE))M --numjobs=4 --time_based --runtime=8 --end_fsync=1"
)
declare -A RESULT
for w in "${WORKLOADS[@]}"; do
    name=${w%%|*}; args=${w#*|}
    for m in $ALL; do
        drop
        # Reads use the file the matching write made.
        file="--filename=$W/$m/bench-${name#*-}"
        case $name in
            seq-read-1M) file="--filename=$W/$m/bench-write-1M";;
            rand-read-4k) file="--filename=$W/$m/bench-write-4k";;
            # One file per job.
            rand-write-4x) mkdir -p "$W/$m/rw4"; file="--directory=$W/$m/rw4";;
        esac
        out=$(fio --name="$name" "$file" $args --ioengine=psync --group_reporting --output-format=json 2>/dev/null)
        RESULT[$name,$m]=$(python3 -c 'import json,sys; j=json.load(sys.stdin)["jobs"][0]; k="read" if j["read"]["io_bytes"] else "write"; print("%.1f" % (j[k]["bw_bytes"]/1048576))' <<<"$out")
    done
done
# Metadata: create, stat, unlink many small files.
N=$((3000 * SCALE))
for m in $ALL; do
    drop
    RESULT[metadata,$m]=$(python3 - "$W/$m/meta" "$N" <<'PY'
import os, sys, time
d, n = sys.argv[1], int(sys.argv[2])
os.mkdir(d)
t = time.monotonic()
for i in range(n):
    fd = os.open(f"{d}/f{i}", os.O_CREAT | os.O_WRONLY, 0o644); os.write(fd, b"x" * 100); os.close(fd)
for i in range(n):
    os.stat(f"{d}/f{i}")
for i in range(n):
    os.unlink(f"{d}/f{i}")
os.sync()
print("%.0f" % (3 * n / (time.monotonic() - t)))
PY
)
done
# The same, from 4 processes at once, each in a directory of its own.
for m in $ALL; do
    drop
    RESULT[metadata-4x,$m]=$(python3 - "$W/$m/meta4" "$N" <<'PY'
import os, sys, time
from multiprocessing import Process
d, n = sys.argv[1], int(sys.argv[2])
def work(k):
    sub = f"{d}/p{k}"
    os.makedirs(sub)
    for i in range(n):
        fd = os.open(f"{sub}/f{i}", os.O_CREAT | os.O_WRONLY, 0o644); os.write(fd, b"x" * 100); os.close(fd)
    for i in range(n):
        os.stat(f"{sub}/f{i}")
    for i in range(n):
        os.unlink(f"{sub}/f{i}")
t = time.monotonic()
ps = [Process(target=work, args=(k,)) for k in range(4)]
for p in ps: p.start()
for p in ps: p.join()
os.sync()
print("%.0f" % (4 * 3 * n / (time.monotonic() - t)))
PY
)
done
# Latency of a cold stat and a cached 4 KiB read of other files while one
# file fsyncs 256 MiB of dirty data (bench/fsync_latency.py).
for m in $ALL; do
    drop
    read -r smed sp99 smax scount rmed rp99 fsecs < <(python3 bench/fsync_latency.py "$W/$m" $((256 * SCALE)))
    RESULT[stat-med-ms,$m]=$smed; RESULT[stat-p99-ms,$m]=$sp99; RESULT[stat-max-ms,$m]=$smax
    RESULT[stats-during,$m]=$scount; RESULT[read-p99-ms,$m]=$rp99; RESULT[fsync-256M-s,$m]=$fsecs
done
printf "\n%-20s %10s %10s %10s %10s %14s %14s %12s\n" workload folio fuse2fs kernel memfs folio/fuse2fs folio/kernel folio/memfs
for name in seq-write-1M seq-read-1M rand-write-4k rand-read-4k parallel-write-4x rand-write-4x metadata metadata-4x \
        stat-med-ms stat-p99-ms stat-max-ms stats-during read-p99-ms fsync-256M-s; do
    f=${RESULT[$name,folio]}; g=${RESULT[$name,fuse2fs]}; k=${RESULT[$name,kernel]}; x=${RESULT[$name,memfs]}
    case $name in
        metadata*) unit=ops/s;; *-ms) unit=ms;; stats-during) unit=count;; *-s) unit=s;; *) unit=MiB/s;;
    esac
    printf "%-20s %10s %10s %10s %10s %14s %14s %12s   (%s)\n" "$name" "$f" "$g" "$k" "$x" \
        "$(python3 -c "print('%.2f' % ($f/$g if $g else 0))")" "$(python3 -c "print('%.2f' % ($f/$k if $k else 0))")" \
        "$(python3 -c "print('%.2f' % ($f/$x if $x else 0))")" "$unit"
done
echo
echo "rand-write-4x / rand-write-4k on folio: $(python3 -c "print('%.2f' % (${RESULT[rand-write-4x,folio]}/${RESULT[rand-write-4k,folio]}))")"
"$FOLIO" umount "$W/folio"
fusermount3 -u "$W/fuse2fs"
# fuse2fs finishes writing after the unmount returns: wait for it.
while pgrep -f "fuse2fs $W/fuse2fs.img" >/dev/null; do sleep 0.1; done
umount "$W/kernel"
fusermount3 -u "$W/memfs"
for m in folio fuse2fs kernel; do
    e2fsck -fn "$W/$m.img" >/dev/null 2>&1 && echo "$m image: e2fsck clean" || echo "$m image: e2fsck NOT clean"
done
