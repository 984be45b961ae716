#!/usr/bin/env bash
# Benchmark `folio export` against qemu-nbd (and nbdkit's file plugin)
# serving a raw file of the same size on the same disk, in one run, with
# fio's nbd engine (libnbd): sequential 1 MiB and random 4 KiB reads and
# writes at queue depth 1 and 16. Prints MiB/s and IOPS per server and the
# ratios folio/qemu-nbd and folio/nbdkit; then folio's xor and
# aes-xts-plain64 transforms on the queue-depth-16 rows, against qemu-nbd.
# Every export is prefilled (one sequential pass) so that reads read data.
# Installs fio, qemu-utils and nbdkit if missing.
#
#   bash bench/nbd.sh                 # 512 MiB exports, 5 s per row
#   SIZE=2G RUNTIME=10 bash bench/nbd.sh
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE=${SIZE:-512M}
RUNTIME=${RUNTIME:-5}
need=()
command -v fio >/dev/null || need+=(fio)
command -v qemu-nbd >/dev/null || need+=(qemu-utils)
command -v nbdkit >/dev/null || need+=(nbdkit)
command -v mkfs.ext4 >/dev/null || need+=(e2fsprogs)
if [ ${#need[@]} -gt 0 ]; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
fi
fio --enghelp 2>/dev/null | grep -qw nbd || { echo "this fio has no nbd engine"; exit 1; }
cargo build --release -q -p folio-cli
FOLIO=$(pwd)/target/release/folio
W=$(mktemp -d "${TMPDIR:-/tmp}/folio-nbd-bench.XXXXXX")
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$W"
}
trap cleanup EXIT

# The servers: folio exports /disk.raw of an ext4 image twice its size;
# qemu-nbd and nbdkit serve a sparse raw file of the export's size.
bytes=$(numfmt --from=iec "$SIZE")
"$FOLIO" mkfs -q "$W/folio.img" --size $((bytes * 2 + (256 << 20)))
truncate -s "$bytes" "$W/qemu.raw" "$W/nbdkit.raw"
head -c 64 /dev/urandom > "$W/key"
start() { # name command...
    local name=$1; shift
    "$@" >/dev/null 2>"$W/$name.log" &
    pids+=($!)
    for _ in $(seq 100); do [ -S "$W/$name.sock" ] && return; sleep 0.1; done
    echo "$name did not start:"; cat "$W/$name.log"; exit 1
}
start folio "$FOLIO" export "$W/folio.img" /disk.raw --size "$bytes" --listen "unix:$W/folio.sock"
start qemu-nbd qemu-nbd -f raw -t -k "$W/qemu-nbd.sock" "$W/qemu.raw"
start nbdkit nbdkit -f -U "$W/nbdkit.sock" file "$W/nbdkit.raw"
uri() { echo "nbd+unix:///?socket=$W/$1.sock"; }

# One fio job: prints "MiB/s IOPS".
job() { # uri rw bs depth [time-based?]
    local extra=(--time_based "--runtime=$RUNTIME")
    [ "${5:-1}" = 0 ] && extra=()
    fio --name=j --ioengine=nbd --uri="$1" --rw="$2" --bs="$3" --iodepth="$4" \
        --size="$SIZE" "${extra[@]}" --output-format=json 2>/dev/null |
        python3 -c '
import json, sys
t = sys.stdin.read()  # fio says "connected to NBD server" first
j = json.loads(t[t.index("{"):])["jobs"][0]
k = "read" if j["read"]["io_bytes"] > 0 else "write"
print("%.0f %.0f" % (j[k]["bw_bytes"] / 2**20, j[k]["iops"]))'
}
for s in folio qemu-nbd nbdkit; do job "$(uri $s)" write 1M 16 0 >/dev/null; done

ROWS="seq-write-1M write 1M 1
seq-write-1M write 1M 16
seq-read-1M read 1M 1
seq-read-1M read 1M 16
rand-write-4K randwrite 4k 1
rand-write-4K randwrite 4k 16
rand-read-4K randread 4k 1
rand-read-4K randread 4k 16"
ratio() { python3 -c "print('%.2fx' % ($1 / $2) if $2 else 'n/a')"; }
printf '%-16s %3s  %18s %18s %18s  %9s %9s\n' workload qd "folio MiB/s (IOPS)" "qemu-nbd" "nbdkit" "f/qemu" "f/nbdkit"
while read -r name rw bs qd; do
    read -r fm fi < <(job "$(uri folio)" "$rw" "$bs" "$qd")
    read -r qm qi < <(job "$(uri qemu-nbd)" "$rw" "$bs" "$qd")
    read -r km ki < <(job "$(uri nbdkit)" "$rw" "$bs" "$qd")
    printf '%-16s %3s  %10s (%6s) %10s (%6s) %10s (%6s)  %9s %9s\n' "$name" "$qd" \
        "$fm" "$fi" "$qm" "$qi" "$km" "$ki" "$(ratio "$fi" "$qi")" "$(ratio "$fi" "$ki")"
done <<< "$ROWS"

# Transforms: folio's export of another file with xor / AES-XTS, against
# the plain qemu-nbd rows at queue depth 16.
echo
printf '%-16s %3s  %18s %18s  %9s\n' "transform" qd "folio MiB/s (IOPS)" "qemu-nbd (plain)" "f/qemu"
for t in xor:0x5a "aes-xts-plain64:$W/key"; do
    tag=${t%%:*}
    "$FOLIO" mkfs -q "$W/$tag.img" --size $((bytes * 2 + (256 << 20)))
    start "f-$tag" "$FOLIO" export "$W/$tag.img" "/$tag.raw" --size "$bytes" --listen "unix:$W/f-$tag.sock" --transform "$t"
    job "$(uri "f-$tag")" write 1M 16 0 >/dev/null
    while read -r name rw bs qd; do
        [ "$qd" = 16 ] || continue
        read -r fm fi < <(job "$(uri "f-$tag")" "$rw" "$bs" "$qd")
        read -r qm qi < <(job "$(uri qemu-nbd)" "$rw" "$bs" "$qd")
        printf '%-16s %3s  %10s (%6s) %10s (%6s)  %9s\n' "$tag $name" "$qd" "$fm" "$fi" "$qm" "$qi" "$(ratio "$fi" "$qi")"
    done <<< "$ROWS"
done
