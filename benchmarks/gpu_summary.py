"""Helpers of benchmarks/gpu_check.sh: measure a GPU's ceilings, and summarise profile JSON files.

python benchmarks/gpu_summary.py calibrate --json ceilings.json
python benchmarks/gpu_summary.py table results/*.json --ceilings ceilings.json --markdown summary.md
python benchmarks/gpu_summary.py merge decode.json prefill.json --json layer.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from moecap_kernels import hardware
from moecap_kernels.report import write_atomic

GOALS = (  # (model, phase, max tokens, metric, threshold): issue 14's targets for the kernels
    ("mixtral-8x7b", "decode", 8, "s_mbu", 0.85),
    ("mixtral-8x7b", "prefill", 4096, "s_mfu", 0.70),
)
MAX_DECODE_LOAD_AMPLIFICATION = 1.05  # triton's kernel counters, decode rows
AUDIT_TOLERANCE = 0.05  # DRAM bytes read under ncu within 5% of the counted bytes, decode T <= 8


def calibrate(json_path: str) -> None:
    device = torch.device("cuda")
    info = hardware.detect_device(device)
    cal = hardware.calibrate(device, ["bfloat16", "float16", "float32"], force=True)
    entry = hardware.datasheet_entry(info.name)
    doc = {"device": info.name, "calibration": cal.to_json()}
    print(
        f"{info.name}: read {cal.read_bandwidth_bytes_per_s / 1e12:.2f} TB/s, "
        f"copy {cal.copy_bandwidth_bytes_per_s / 1e12:.2f} TB/s (r+w)"
    )
    for dtype, flops in cal.gemm_flops_per_s.items():
        print(f"  {dtype} GEMM {flops / 1e12:.0f} TFLOP/s (n={cal.gemm_sizes[dtype]})")
    if entry is not None:  # printed for the log only: table() compares against the measured ceilings
        print(
            f"  datasheet {entry.name}: {entry.bandwidth_bytes_per_s / 1e12:.2f} TB/s, "
            f"bf16 {entry.peak_flops('bfloat16') / 1e12:.0f} TFLOP/s; measured/datasheet: bandwidth "
            f"{cal.read_bandwidth_bytes_per_s / entry.bandwidth_bytes_per_s:.2f}, bf16 "
            f"{cal.gemm_flops_per_s['bfloat16'] / entry.peak_flops('bfloat16'):.2f}"
        )
    write_atomic(json_path, json.dumps(doc, indent=2) + "\n")


def _rows(paths: list[str]) -> list[dict[str, Any]]:
    rows = []
    for path in paths:
        if Path(path).is_file():
            rows += json.loads(Path(path).read_text())["results"]
    return rows


def _label(row: dict[str, Any]) -> str:
    """The backend, and the experts' weight format when they are quantized."""
    fmt = row.get("weight_format", "none")
    return row["backend"] if fmt == "none" else f"{row['backend']} ({fmt})"


def table(paths: list[str], ceilings: str | None, markdown: str | None) -> None:
    rows = _rows(paths)
    measured = None
    if ceilings and Path(ceilings).is_file():
        cal = json.loads(Path(ceilings).read_text())["calibration"]
        measured = (cal["read_bandwidth_bytes_per_s"], cal["gemm_flops_per_s"])
    columns = ("model", "phase", "T", "backend", "median", "S-MBU", "S-MBU meas.", "S-MFU", "S-MFU meas.",
               "rel. err", "pad. waste")  # fmt: skip
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    for r in rows:
        bw_meas = flops_meas = "—"
        if measured is not None:
            seconds = r["time_s"]["median"]
            bw_meas = f"{r['bytes']['compulsory'] / seconds / measured[0]:.2f}"
            peak = measured[1].get(r["dtype"])
            flops_meas = f"{r['flops']['useful'] / seconds / peak:.2f}" if peak else "—"
        kernel = r.get("kernel")
        waste = f"{kernel['padding_waste']:.2f}" if kernel else "—"
        lines.append(
            f"| {r['model']} | {r['phase']} | {r['tokens']} | {_label(r)} "
            f"| {r['time_s']['median'] * 1e3:.3f} ms "
            f"| {r['s_mbu']:.2f} | {bw_meas} | {r['s_mfu']:.2f} | {flops_meas} "
            f"| {r['accuracy']['rel_error']:.1e} | {waste} |"
        )
    graphed = [r for r in rows if "time_s_eager" in r]
    if graphed:
        lines.append("\nkernel time (CUDA graph replays) vs eager launches:")
        for r in graphed:
            eager = r["time_s_eager"]["median"]
            kernel = r["time_s"]["median"]
            lines.append(f"  {r['model']} {r['phase']} T={r['tokens']} {_label(r)}: {kernel * 1e6:.1f} µs "
                         f"vs {eager * 1e6:.1f} µs eager ({eager / kernel:.2f}×)")  # fmt: skip
    goals = goal_lines(rows)
    if goals:
        lines += ["", *goals]
    text = "\n".join(lines) + "\n"
    if markdown:
        write_atomic(markdown, text)
    print(text)


def merge(paths: list[str], json_path: str) -> None:
    """One results file of the rows of several (decode and prefill runs of one layer)."""
    docs = [json.loads(Path(p).read_text()) for p in paths if Path(p).is_file()]
    if not docs:
        raise SystemExit(f"nothing to merge: {', '.join(paths)} missing")
    merged = {**docs[0], "command": " && ".join(d["command"] for d in docs),
              "results": [r for d in docs for r in d["results"]]}  # fmt: skip
    write_atomic(json_path, json.dumps(merged, indent=2) + "\n")


def _key(row: dict[str, Any]) -> tuple[str, str, str]:
    return row["model"], row["phase"], row.get("weight_format", "none")


def goal_lines(rows: list[dict[str, Any]]) -> list[str]:
    """Each goal against the best row that can meet it."""
    lines = []
    for model, phase, max_tokens, metric, threshold in GOALS:
        wanted = (model, phase, "none")
        best = [r for r in rows if _key(r) == wanted and r["tokens"] <= max_tokens]
        for tokens in sorted({r["tokens"] for r in best}):
            top = max((r for r in best if r["tokens"] == tokens), key=lambda r: r[metric])
            verdict = "meets" if top[metric] >= threshold else "misses"
            lines.append(f"goal {model} {phase} T={tokens}: best {top['backend']} {metric} {top[metric]:.2f} "
                         f"({verdict} {threshold} of {top['peak']['source']})")  # fmt: skip
    for r in rows:
        kernel = r.get("kernel")
        if kernel and r["phase"] == "decode":
            amp = kernel["load_amplification"]
            verdict = "meets" if amp <= MAX_DECODE_LOAD_AMPLIFICATION else "misses"
            lines.append(f"goal load amplification {r['model']} T={r['tokens']} {_label(r)}: {amp:.3f} "
                         f"({verdict} ≤ {MAX_DECODE_LOAD_AMPLIFICATION})")  # fmt: skip
        audit = r.get("audit")
        if audit and r["tokens"] <= 8:
            if "read_over_counted" not in audit:
                lines.append(f"audit {r['model']} T={r['tokens']} {_label(r)}: {audit.get('unavailable')}")
                continue
            ratio = audit["read_over_counted"]
            verdict = "meets" if abs(ratio - 1) <= AUDIT_TOLERANCE else "misses"
            lines.append(f"goal audit {r['model']} T={r['tokens']} {_label(r)}: DRAM read / counted "
                         f"{ratio:.3f} ({verdict} within {AUDIT_TOLERANCE:.0%})")  # fmt: skip
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    cal = sub.add_parser("calibrate")
    cal.add_argument("--json", required=True)
    tab = sub.add_parser("table")
    tab.add_argument("files", nargs="+")
    tab.add_argument("--ceilings")
    tab.add_argument("--markdown")
    mer = sub.add_parser("merge")
    mer.add_argument("files", nargs="+")
    mer.add_argument("--json", required=True)
    args = parser.parse_args()
    if args.command == "calibrate":
        calibrate(args.json)
    elif args.command == "merge":
        merge(args.files, args.json)
    else:
        table(args.files, args.ceilings, args.markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
