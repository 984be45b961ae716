#!/bin/bash
# fsync-heavy fio through folio mounts: compare two folio binaries (for
# example before and after a journal change) on identical fresh images.
#   bench/fsync.sh OLD_FOLIO NEW_FOLIO [ROUNDS]
# Needs root (FUSE), fio and e2fsprogs.
set -euo pipefail
OLD=${1:?usage: bench/fsync.sh OLD_FOLIO NEW_FOLIO [ROUNDS]}
NEW=${2:?usage: bench/fsync.sh OLD_FOLIO NEW_FOLIO [ROUNDS]}
ROUNDS=${3:-2}
dir=$(mktemp -d /tmp/folio-fsync.XXXXXX)
trap 'fusermount3 -u "$dir/mnt" 2>/dev/null || true; rm -rf "$dir"' EXIT
mkdir -p "$dir/mnt"
iops() { awk -F';' '{print $49}'; }
run() {
  local bin=$1 name=$2
  rm -f "$dir/img"
  "$NEW" mkfs -q -s 512M "$dir/img"
  "$bin" mount "$dir/img" "$dir/mnt" >/dev/null
  local r w
  r=$(fio --name=fs --directory="$dir/mnt" --rw=randwrite --bs=4k --size=8M --fsync=1 \
      --ioengine=psync --output-format=terse --terse-version=3 | iops)
  w=$(fio --name=fa --directory="$dir/mnt" --rw=write --bs=4k --size=8M --fdatasync=1 \
      --ioengine=psync --output-format=terse --terse-version=3 | iops)
  fusermount3 -u "$dir/mnt"
  sleep 0.5
  local ok=clean
  e2fsck -fn "$dir/img" >/dev/null 2>&1 || ok=NOT-CLEAN
  echo "$name: randwrite+fsync $r IOPS, append+fdatasync $w IOPS, e2fsck $ok"
}
for _ in $(seq "$ROUNDS"); do
  run "$OLD" old
  run "$NEW" new
done
