#!/usr/bin/env python3
"""Latency of small requests on one file while another file fsyncs a lot
of dirty data (issue 12's "writeback off the request path").

    python3 bench/fsync_latency.py DIR [MIB]

In DIR (a mount): makes 4,000 small files and a 1 MiB file it reads once
(so its pages are cached), dirties MIB (default 256) MiB of a big file,
waits 1.5 s (so the kernel's FUSE entry and attribute caches of the small
files expire and every stat below is a cold lookup that reaches the
server), then fsyncs the big file in one thread while the main thread
stats the small files one after another and reads 4 KiB of the cached
file, until the fsync returns. Prints one line:

    stat_med_ms stat_p99_ms stat_max_ms stats read_med_ms read_p99_ms fsync_s
"""
import os
import sys
import threading
import time


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * p))] * 1000 if xs else float("nan")


def main():
    d = sys.argv[1]
    mib = int(sys.argv[2]) if len(sys.argv) > 2 else 256
    small = os.path.join(d, "lat-small")
    os.makedirs(small, exist_ok=True)
    names = [os.path.join(small, f"f{i}") for i in range(4000)]
    for n in names:
        os.close(os.open(n, os.O_CREAT | os.O_WRONLY, 0o644))
    cached = os.path.join(d, "lat-cached")
    with open(cached, "wb") as f:
        f.write(os.urandom(1 << 20))
    rfd = os.open(cached, os.O_RDONLY)
    while os.read(rfd, 1 << 20):
        pass
    big = os.open(os.path.join(d, "lat-big"), os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
    chunk = os.urandom(1 << 20)
    for _ in range(mib):
        os.write(big, chunk)
    time.sleep(1.5)
    done = threading.Event()
    took = []

    def syncer():
        t = time.monotonic()
        os.fsync(big)
        took.append(time.monotonic() - t)
        done.set()

    stats, reads = [], []
    th = threading.Thread(target=syncer)
    th.start()
    i = 0
    while not done.is_set():
        a = time.perf_counter()
        os.stat(names[i % len(names)])
        b = time.perf_counter()
        os.pread(rfd, 4096, (i * 4096) % (1 << 20))
        c = time.perf_counter()
        stats.append(b - a)
        reads.append(c - b)
        i += 1
    th.join()
    os.close(big)
    os.close(rfd)
    print(
        "%.3f %.3f %.3f %d %.3f %.3f %.2f"
        % (
            pct(stats, 0.5),
            pct(stats, 0.99),
            max(stats) * 1000 if stats else float("nan"),
            len(stats),
            pct(reads, 0.5),
            pct(reads, 0.99),
            took[0],
        )
    )


if __name__ == "__main__":
    main()
