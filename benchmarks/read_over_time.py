"""Does this machine read the same buffer at the same speed a few seconds later? One fresh buffer,
read over and over for a while (as the calibration and a profile's weights are), its bandwidth
printed per half second. On a virtual machine the memory behind a buffer can change under it (the
host backing it with other pages), and a calibration whose two trials straddle such a change is
reported unstable; this shows whether that is what happened.

    python benchmarks/read_over_time.py [--seconds 8] [--mib 512] [--buffers 2]

Writes benchmarks/results/read-over-time-<date>-<cpu>.md (atomically).
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import time

import torch
from results_file import RESULTS, command, stem

from moecap_kernels.files import write_atomic
from moecap_kernels.hardware import detect_device
from moecap_kernels.streaming import distinct_pages, read_pass

BUCKET_S = 0.5


def read_for(seconds: float, nbytes: int) -> list[tuple[float, float]]:
    """(bucket start s, median GB/s of the reads in that bucket) for one freshly made buffer."""
    buffer = distinct_pages(nbytes, "cpu")
    read = read_pass(torch.device("cpu"))
    samples: list[tuple[float, float]] = []
    start = time.perf_counter()
    while (now := time.perf_counter()) - start < seconds:
        read(buffer)
        samples.append((now - start, nbytes / (time.perf_counter() - now) / 1e9))
    buckets: dict[int, list[float]] = {}
    for t, rate in samples:
        buckets.setdefault(int(t / BUCKET_S), []).append(rate)
    return [(k * BUCKET_S, statistics.median(v)) for k, v in sorted(buckets.items())]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--mib", type=int, default=512)
    parser.add_argument("--buffers", type=int, default=2, help="one after another, each made fresh")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    info = detect_device("cpu")
    runs = [read_for(args.seconds, args.mib << 20) for _ in range(args.buffers)]
    lines = [
        f"# One buffer read over and over: {info.name}, {info.cores} cores",
        "",
        f"- date: {dt.date.today().isoformat()}; torch {torch.__version__}",
        f"- command: `{command('read_over_time.py', argv)}`",
        f"- {args.mib} MiB per buffer, read by the calibration's reader; median GB/s per {BUCKET_S} s",
        "",
        "| from s | " + " | ".join(f"buffer {i + 1} GB/s" for i in range(len(runs))) + " |",
        "| ---: |" + " ---: |" * len(runs),
    ]
    for row in range(max(len(r) for r in runs)):
        cells = [f"{r[row][1]:.1f}" if row < len(r) else "" for r in runs]
        lines.append(f"| {row * BUCKET_S:.1f} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    write_atomic(stem(args.out, "read-over-time", info.name).with_suffix(".md"), text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
