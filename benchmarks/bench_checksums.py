"""Checkpoint checksum speed: MB/s of sha256 and blake2b over a file, one thread and several files in threads.

    python benchmarks/bench_checksums.py [--size-mb 256] [--files 4] [--repeats 3]

``checkpoint.integrity`` hashes with sha256 (chosen from these figures; hashlib releases the GIL, so a rank
hashes its shard files in threads). Prints one line per case; results go in docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

CHUNK = 8 << 20


def hash_file(path: Path, algorithm: str) -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-mb", type=int, default=256, help="bytes hashed per case")
    p.add_argument("--files", type=int, default=4, help="files hashed in parallel threads")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as d:
        per = args.size_mb // args.files
        files = []
        for i in range(args.files):
            f = Path(d) / f"__0_{i}.distcp"
            f.write_bytes(os.urandom(per << 20))
            files.append(f)
        for f in files:  # warm the page cache: measure hashing, not the disk
            hash_file(f, "md5")
        total = per * args.files
        print(f"{total} MB in {args.files} files of {per} MB, page cache warm, {os.cpu_count()} CPUs")
        for algorithm in ("sha256", "blake2b"):
            for threads in (1, args.files):
                times = []
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    with ThreadPoolExecutor(max_workers=threads) as pool:
                        list(pool.map(lambda f, a=algorithm: hash_file(f, a), files))
                    times.append(time.perf_counter() - t0)
                med = statistics.median(times)
                print(f"{algorithm:8s} {threads} thread(s): {total / med:7.0f} MB/s (median of {args.repeats})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
