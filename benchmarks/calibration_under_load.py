"""A calibration on a quiet machine and one while other processes keep the CPUs busy, each through the
CLI (``--calibrate``, a small profile) in a cache folder of its own: which was cached, and what the
report said.

    python benchmarks/calibration_under_load.py [--busy N] [--repeats R]   # N spinners (default: 1/core)

Writes benchmarks/results/calibration-under-load-<date>-<cpu>.md (atomically).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

from results_file import RESULTS, command, stem

from moecap_kernels.files import write_atomic
from moecap_kernels.hardware import detect_device

ROOT = Path(__file__).resolve().parent.parent
PROFILE = ["-m", "moecap_kernels.profile", "--calibrate", "--model", "olmoe-1b-7b", "--batch", "1"]
PROFILE += ["--backend", "loop", "--warmup", "0", "--reps", "3", "--no-accuracy"]
SPIN = "while True: pass"


def profile_once(cache: Path) -> tuple[str, list[str]]:
    """(the CLI's stdout, the calibration files it left in ``cache``)."""
    env = {**os.environ, "MOECAP_CACHE_DIR": str(cache), "COLUMNS": "200"}
    done = subprocess.run(
        [sys.executable, *PROFILE], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    if done.returncode != 0:
        raise SystemExit(f"profile failed ({done.returncode}): {done.stderr.strip()[-300:]}")
    return done.stdout, sorted(p.name for p in cache.glob("calibration-*.json"))


def lines_about_calibration(stdout: str) -> list[str]:
    keep = ("calibrat", "S-MBU, MBU")
    return [line.strip() for line in stdout.splitlines() if any(k in line for k in keep)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--busy", type=int, default=os.cpu_count() or 1, help="spinning processes")
    parser.add_argument("--repeats", type=int, default=2, help="quiet / busy pairs, in turn")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    info = detect_device("cpu")
    sections = []
    with tempfile.TemporaryDirectory(prefix="moecap-load-") as scratch:
        pairs = [(f"quiet, run {i + 1}", 0) for i in range(args.repeats)]
        pairs = [
            p for i in range(args.repeats) for p in (pairs[i], (f"{args.busy} busy, run {i + 1}", args.busy))
        ]
        for label, busy in pairs:
            spinners = [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(busy)]
            try:
                out, cached = profile_once(Path(scratch) / re.sub(r"\W+", "-", label))
            finally:
                for spinner in spinners:
                    spinner.kill()
                    spinner.wait()
            sections += [f"## {label}", "", f"cached: {', '.join(cached) or 'nothing'}", "", "```"]
            sections += [*lines_about_calibration(out), "```", ""]
    head = [
        f"# Calibration quiet and under load: {info.name}, {info.cores} cores",
        "",
        f"- date: {dt.date.today().isoformat()}",
        f"- command: `{command('calibration_under_load.py', argv)}`",
        f"- each run: `python {shlex.join(PROFILE)}` in an empty MOECAP_CACHE_DIR",
        "",
    ]
    text = "\n".join(head + sections)
    write_atomic(stem(args.out, "calibration-under-load", info.name).with_suffix(".md"), text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
