"""What a new user waits for: the extension build, a quick and a full calibration, the default profile
on its first run (empty cache: build + calibration + rows) and once cached, and the test suite.

Each figure is a whole process, timed from outside, in a cache folder of its own (``MOECAP_CACHE_DIR``)
so nothing is reused that a new user would not have; repeated ``--repeats`` times (median, min,
max). The calibrations also report their own duration and whether they were stable (the spread of
their trials, the share of the CPU other processes took).

    python benchmarks/first_run.py                 # 2 repeats, no test suite
    python benchmarks/first_run.py --with-tests    # the README's test command as well
    python benchmarks/first_run.py --simulate-llc-mib 480   # calibrations as on a guest reporting 480 MiB

Writes benchmarks/results/first-run-<date>-<cpu>.md and .json (atomically).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from results_file import RESULTS, command, stem

from moecap_kernels.files import write_all_atomic
from moecap_kernels.hardware import detect_device

ROOT = Path(__file__).resolve().parent.parent
CALIBRATE = (
    "import json, sys; from moecap_kernels import hardware; {patch}"
    "c = hardware.calibrate('cpu', ['bfloat16'], quick={quick}, force=True); "
    "print(json.dumps({{'duration_s': c.duration_s, 'stable': c.stable, 'why': c.unstable_reason, "
    "'read_GBps': c.read_bandwidth_bytes_per_s / 1e9, 'read_spread': c.read_bandwidth_spread, "
    "'bf16_GFLOPs': c.gemm_flops_per_s['bfloat16'] / 1e9, 'gemm_spread': c.gemm_spreads['bfloat16'], "
    "'others_cpu_share': c.others_cpu_share}}))"
)
# A machine that reports an LLC of N MiB (a guest showing its host's L3), simulated on this one.
LLC_PATCH = (
    "import dataclasses; from moecap_kernels.hardware import calibration as cal; real = cal.detect_device; "
    "cal.detect_device = lambda d: dataclasses.replace(real(d), llc_bytes={mib} << 20); "
)


@dataclass
class Step:
    """One command, timed as a whole process, in the cache folder named ``cache`` (new each repeat:
    steps naming the same one share it, in order)."""

    name: str
    argv: list[str]
    cache: str
    wall_s: list[float] = field(default_factory=list)
    reports: list[dict[str, Any]] = field(default_factory=list)  # what a calibration said of itself
    calibrated: list[bool] = field(default_factory=list)  # whether a profile measured a calibration

    @property
    def command(self) -> str:
        return shlex.join(["python", *self.argv[1:]])


def steps(with_tests: bool, simulated_llc_mib: int | None = None) -> list[Step]:
    py = sys.executable
    out = [
        Step("extension build", [py, "-m", "moecap_kernels._ext"], "built"),
        Step("quick calibration", [py, "-c", CALIBRATE.format(quick=True, patch="")], "built"),
        Step("full calibration", [py, "-c", CALIBRATE.format(quick=False, patch="")], "built"),
        Step("default profile, first run", [py, "-m", "moecap_kernels.profile"], "first run"),
        Step("default profile, cached", [py, "-m", "moecap_kernels.profile"], "first run"),
    ]
    if simulated_llc_mib:
        patch = LLC_PATCH.format(mib=simulated_llc_mib)
        for quick in (True, False):
            name = f"{'quick' if quick else 'full'} calibration, LLC reported as {simulated_llc_mib} MiB"
            out.append(Step(name, [py, "-c", CALIBRATE.format(quick=quick, patch=patch)], "built"))
    if with_tests:
        out.append(Step("test suite", [py, "-m", "pytest", "-p", "no:cacheprovider"], "built"))
    return out


def run_step(step: Step, cache: Path) -> None:
    env = {**os.environ, "MOECAP_CACHE_DIR": str(cache)}
    started = time.perf_counter()
    done = subprocess.run(step.argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    step.wall_s.append(time.perf_counter() - started)
    if done.returncode != 0:
        raise SystemExit(f"{step.name} failed ({done.returncode}): {done.stderr.strip()[-500:]}")
    if step.argv[1] == "-c":
        step.reports.append(json.loads(done.stdout.strip().splitlines()[-1]))
    if "moecap_kernels.profile" in step.argv:
        step.calibrated.append("calibrating" in done.stdout)


def summary(values: list[float]) -> str:
    return f"{statistics.median(values):.1f} s ({min(values):.1f}–{max(values):.1f})"


def markdown(all_steps: list[Step], header: dict[str, str]) -> str:
    lines = [f"# First run on {header['machine']}", ""]
    lines += [f"- {k}: {v}" for k, v in header.items() if k != "machine"]
    lines += ["", "| step | wall, median (min–max) | runs | command |", "| --- | ---: | ---: | --- |"]
    for s in all_steps:
        calibrated = f", calibrated in {sum(s.calibrated)} of them" if s.calibrated else ""
        runs = f"{len(s.wall_s)}{calibrated}"
        shown = s.command if len(s.command) <= 80 else s.command[:40] + "… (whole in the JSON)"
        lines.append(f"| {s.name} | {summary(s.wall_s)} | {runs} | `{shown}` |")
    calibrations = [s for s in all_steps if s.reports]
    if calibrations:
        lines += ["", "Calibrations, as they reported themselves (inside the process, imports excluded):", ""]
        lines += [
            "| step | own time | stable | read GB/s (spread) | bf16 GFLOP/s (spread) | others' CPU share |",
            "| --- | ---: | --- | ---: | ---: | ---: |",
        ]
        for s in calibrations:
            for r in s.reports:
                share = "unknown" if r["others_cpu_share"] is None else f"{r['others_cpu_share']:.1%}"
                lines.append(
                    f"| {s.name} | {r['duration_s']:.1f} s | {'yes' if r['stable'] else 'no: ' + r['why']} "
                    f"| {r['read_GBps']:.1f} ({r['read_spread']:.1%}) "
                    f"| {r['bf16_GFLOPs']:.0f} ({r['gemm_spread']:.1%}) | {share} |"
                )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--with-tests", action="store_true", help="time the README's test command too")
    parser.add_argument(
        "--simulate-llc-mib", type=int, help="also calibrate as if the machine reported an LLC of N MiB"
    )
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    info = detect_device("cpu")
    all_steps = steps(args.with_tests, args.simulate_llc_mib)
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory(prefix="moecap-first-run-") as scratch:
            for step in all_steps:  # in order: the cached profile finds what the first run left
                cache = Path(scratch) / step.cache.replace(" ", "-")
                run_step(step, cache)
                print(f"{step.name}: {step.wall_s[-1]:.1f} s", flush=True)
    header = {
        "machine": f"{info.name}, {info.cores} cores, LLC {info.llc_bytes >> 20} MiB, "
        f"{info.memory_total_bytes / 2**30:.0f} GiB",
        "date": dt.date.today().isoformat(),
        "software": f"Python {platform.python_version()}, torch {torch.__version__}, {platform.platform()}",
        "command": command("first_run.py", argv),
        "how": "each step a whole process timed from outside; the build and the first run each in an "
        "empty MOECAP_CACHE_DIR; the calibrations (forced) and the tests beside the built extension",
    }
    path = stem(args.out, "first-run", info.name)
    text = markdown(all_steps, header)
    doc = {"header": header, "steps": [{**asdict(s), "command": s.command} for s in all_steps]}
    write_all_atomic({path.with_suffix(".md"): text, path.with_suffix(".json"): json.dumps(doc, indent=2)})
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
