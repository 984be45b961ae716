#!/usr/bin/env bash
# Build the fuzz targets with libFuzzer's coverage instrumentation on
# stable Rust (the flags cargo-fuzz passes, without its nightly-only
# sanitizer switch) and run each for a bounded time.
#
#   bash fuzz/run.sh [SECONDS_PER_TARGET] [TARGET ...]
#
# Seeds: fuzz/corpus/<target>/ (made here from real images for `image`
# and `journal`); findings land in fuzz/artifacts/<target>/ and make the
# script fail. Prints executions and coverage per target.
set -euo pipefail
cd "$(dirname "$0")"
secs="${1:-30}"
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(image journal dirent extent xattr nbd_request)
export PATH="$PATH:/sbin:/usr/sbin"

export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing -Cdebug-assertions -Coverflow-checks"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
# An explicit --target keeps RUSTFLAGS off the build scripts, which run
# on the host without libFuzzer's runtime.
triple="$(rustc -vV | sed -n 's/^host: //p')"
cargo build --release --bins --target "$triple"
bin="$CARGO_TARGET_DIR/$triple/release"

# Seed corpora from real images: mke2fs's and folio's, small enough to
# mutate quickly (1 KiB blocks, a few hundred KiB).
seed_images() {
    local out="$1" tmp
    tmp="$(mktemp -d)"
    mkdir -p "$tmp/tree/d"
    for i in $(seq 1 40); do echo "file $i" > "$tmp/tree/d/f$i"; done
    head -c 70000 /dev/urandom > "$tmp/tree/big"
    ln -s d/f1 "$tmp/tree/link"
    local n=0
    for opts in "-t ext4 -O ^has_journal" "-t ext2" "-t ext4 -O ^has_journal,^metadata_csum" \
                "-t ext4 -O ^has_journal,^extent,^64bit" "-t ext4 -O ^has_journal,inline_data"; do
        n=$((n + 1))
        # shellcheck disable=SC2086
        mkfs.ext4 -q -F $opts -b 1024 -N 64 -d "$tmp/tree" "$out/mke2fs-$n.img" 512k >/dev/null 2>&1 || true
    done
    # With a journal (1,024 blocks at least): a larger seed.
    mkfs.ext4 -q -F -b 1024 -N 64 -J size=1 -d "$tmp/tree" "$out/mke2fs-journal.img" 1300k >/dev/null 2>&1 || true
    rm -rf "$tmp"
}

status=0
for t in "${targets[@]}"; do
    corpus="corpus/$t"
    mkdir -p "$corpus" "artifacts/$t"
    case "$t" in
        image) [ -n "$(ls -A "$corpus")" ] || seed_images "$corpus" ;;
        journal)
            if [ -z "$(ls -A "$corpus")" ]; then
                # Logs that need recovery: folio's torture workload killed
                # mid-run leaves committed transactions unreplayed (seeds
                # differ by how long it ran), plus mke2fs's empty log.
                tmpd="$(mktemp -d)"
                folio="${FOLIO:-../target/debug/folio}"
                [ -x "$folio" ] || (cd .. && cargo build -q -p folio-cli)
                for run in 0.3 0.6 1.2; do
                    "$folio" mkfs -q -F -b 1k -J size=1 "$tmpd/j.img" 8M
                    timeout -s KILL "$run" "$folio" torture "$tmpd/j.img" >/dev/null 2>&1 || true
                    start=$(debugfs -R "bmap <8> 0" "$tmpd/j.img" 2>/dev/null)
                    dd if="$tmpd/j.img" of="$corpus/torture-$run" bs=1024 skip="$start" \
                        count=1024 status=none
                done
                mkfs.ext4 -q -F -b 1024 -J size=1 "$tmpd/m.img" 4M >/dev/null
                start=$(debugfs -R "bmap <8> 0" "$tmpd/m.img" 2>/dev/null)
                dd if="$tmpd/m.img" of="$corpus/mke2fs-empty" bs=1024 skip="$start" count=64 \
                    status=none
                rm -rf "$tmpd"
            fi
            ;;
        nbd_request)
            if [ -z "$(ls -A "$corpus")" ]; then
                # A client's session: fixed newstyle flags, STRUCTURED_REPLY,
                # GO "fuzz", then WRITE 512 @0 with its data, READ, FLUSH,
                # TRIM, WRITE_ZEROES, CACHE, DISC (big-endian fields).
                bytes() { for v in "$@"; do printf "\\x$(printf %02x "$v")"; done; }
                opt() { bytes 0x49 0x48 0x41 0x56 0x45 0x4f 0x50 0x54; }
                {
                    bytes 0 0 0 3
                    opt; bytes 0 0 0 8 0 0 0 0
                    opt; bytes 0 0 0 7 0 0 0 10 0 0 0 4; printf fuzz; bytes 0 0
                    for cmd in 1 0 3 4 6 5 2; do
                        bytes 0x25 0x60 0x95 0x13 0 0 0 "$cmd" 0 0 0 0 0 0 0 "$cmd"
                        bytes 0 0 0 0 0 0 2 0 0 0 2 0
                        [ "$cmd" = 1 ] && head -c 512 /dev/zero | tr '\0' 'Z'
                    done
                } > "$corpus/session"
            fi
            ;;
    esac
    max_len=4096
    [ "$t" = image ] && max_len=$((2 << 20))
    [ "$t" = journal ] && max_len=$((1 << 20))
    [ "$t" = nbd_request ] && max_len=65536
    echo "== fuzz $t for ${secs}s"
    log="artifacts/$t.log"
    if ! "$bin/$t" -max_total_time="$secs" -max_len="$max_len" -rss_limit_mb=2048 \
        -timeout=20 -print_final_stats=1 -artifact_prefix="artifacts/$t/" "$corpus" >"$log" 2>&1; then
        echo "FOUND: $t (see $log and artifacts/$t/)"
        tail -40 "$log"
        status=1
    fi
    grep -E "^stat::number_of_executed_units|^stat::peak_rss_mb|cov: " "$log" | tail -3 || true
done
exit $status
