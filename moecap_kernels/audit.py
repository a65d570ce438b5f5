"""The hardware-counter audit (``profile --audit``, CUDA): the DRAM bytes Nsight Compute saw one
forward move, beside the compulsory bytes this project counts for it.

For each row a child process (``python -m moecap_kernels.audit``) builds the row's layer from its
spec and seed, runs one untimed forward (kernels compiled, caches warm), then one forward inside the
NVTX range ``moecap_audit``; ``ncu`` profiles the kernels of that range alone with
``dram__bytes_read.sum`` and ``dram__bytes_write.sum``, summed here over them. The counted bytes
are the child's own (the same routing as the row's: same inputs, same seed). A ratio near 1 says the
count is what the hardware moved; above it, re-reads or traffic the formulas leave out (the router's
scores, the alignment, partial sums); below it, data the L2 held from before the range.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

METRICS = ("dram__bytes_read.sum", "dram__bytes_write.sum")
RANGE = "moecap_audit"
UNITS = {"byte": 1, "kbyte": 1e3, "mbyte": 1e6, "gbyte": 1e9, "tbyte": 1e12, "b": 1, "kb": 1e3, "mb": 1e6,
         "gb": 1e9}  # fmt: skip
TIMEOUT_S = 600


def ncu_path() -> str | None:
    return shutil.which("ncu")


def ncu_command(ncu: str, child: Sequence[str]) -> list[str]:
    """``ncu`` over the child's forward inside the ``moecap_audit`` range, as CSV of raw metrics."""
    return [
        ncu, "--metrics", ",".join(METRICS), "--csv", "--page", "raw", "--nvtx",
        "--nvtx-include", f"{RANGE}/", "--target-processes", "all", *child,
    ]  # fmt: skip


def parse_ncu_csv(text: str) -> dict[str, float]:
    """{metric: sum over the kernels, "kernels": their number} of ``ncu --csv --page raw`` output,
    its units row honoured; the lines ncu prints around the table (``==PROF==`` notices) are
    skipped. ValueError when there is no table."""
    lines = [line for line in text.splitlines() if line.startswith('"')]
    rows = list(csv.reader(io.StringIO("\n".join(lines))))
    if not rows:
        raise ValueError("ncu printed no metrics table (no kernel inside the audited range?)")
    header, body = rows[0], rows[1:]
    units = {}
    if body and body[0] and not body[0][0].strip().isdigit():  # the units row: "", "", …, "byte"
        units = dict(zip(header, body[0], strict=False))
        body = body[1:]
    totals = dict.fromkeys(METRICS, 0.0)
    kernels = 0
    for row in body:
        values = dict(zip(header, row, strict=False))
        if not all(m in values for m in METRICS):
            continue
        kernels += 1
        for metric in METRICS:
            scale = UNITS.get(units.get(metric, "byte").strip().lower(), 1)
            totals[metric] += float(values[metric].replace(",", "")) * scale
    if not kernels:
        raise ValueError("ncu's table has no row with the DRAM metrics")
    return {**totals, "kernels": kernels}


def audit_row(spec: Any, backend: str, tokens: int, seed: int, device: str, routing: str) -> dict[str, Any]:
    """The audit of one row: {"dram_bytes_read", "dram_bytes_write", "kernels", "counted_bytes",
    "read_over_counted", "command"}, or {"unavailable": why}."""
    ncu = ncu_path()
    if ncu is None:
        return {"unavailable": "ncu (Nsight Compute) is not on PATH"}
    with tempfile.TemporaryDirectory(prefix="moecap-audit-") as folder:
        spec_path, counted_path = Path(folder) / "spec.json", Path(folder) / "counted.json"
        spec_path.write_text(json.dumps(spec.to_dict()))
        arguments = (spec_path, backend, tokens, seed, device, routing, counted_path)
        child = [sys.executable, "-m", "moecap_kernels.audit", *map(str, arguments)]
        command = ncu_command(ncu, child)
        env = {**os.environ, "MOECAP_NO_ENERGY": "1"}
        try:
            done = subprocess.run(
                command, capture_output=True, text=True, timeout=TIMEOUT_S, env=env, check=False
            )
        except subprocess.TimeoutExpired:
            return {"unavailable": f"ncu did not finish in {TIMEOUT_S} s"}
        if done.returncode != 0 or not counted_path.is_file():
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            return {"unavailable": f"ncu exited {done.returncode}: {tail[0][:200]}"}
        try:
            totals = parse_ncu_csv(done.stdout)
        except ValueError as exc:
            return {"unavailable": str(exc)}
        counted = json.loads(counted_path.read_text())["compulsory_bytes"]
    return {
        "dram_bytes_read": totals[METRICS[0]],
        "dram_bytes_write": totals[METRICS[1]],
        "kernels": totals["kernels"],
        "counted_bytes": counted,
        "read_over_counted": totals[METRICS[0]] / counted,
        "command": " ".join(command[: -len(child)]) + " python -m moecap_kernels.audit …",
    }


def child_main(argv: Sequence[str]) -> int:
    """The audited process: one warm-up forward, then one inside the ``moecap_audit`` NVTX range;
    writes the counted compulsory bytes of that forward to the last argument."""
    import torch

    from moecap_kernels.backends import get_backend
    from moecap_kernels.counters import CountAccumulator
    from moecap_kernels.dtypes import torch_dtype
    from moecap_kernels.metrics import traffic
    from moecap_kernels.quant.layer import in_format
    from moecap_kernels.routing import parse_routing, route_tokens
    from moecap_kernels.runner import forced_ids
    from moecap_kernels.spec import MoESpec
    from moecap_kernels.weights import random_weights

    spec_path, backend_name, tokens, seed, device_text, routing, out = argv
    spec = MoESpec.from_dict(json.loads(Path(spec_path).read_text()), origin=spec_path)
    device, tokens, seed = torch.device(device_text), int(tokens), int(seed)
    weights = in_format(random_weights(spec.with_format("none"), device, seed=seed), spec)
    gen = torch.Generator(device=device).manual_seed(seed + tokens)
    x = torch.randn(tokens, spec.hidden_size, generator=gen, device=device).to(torch_dtype(spec.act_dtype))
    forced = forced_ids(parse_routing(routing), tokens, spec, seed)
    forced = None if forced is None else forced.to(device)
    backend = get_backend(backend_name)
    ids, w = route_tokens(x, weights, spec, forced)
    backend.prepare(weights, spec, tokens)
    backend.forward(x, weights, spec, ids, w)  # warm-up, outside the range
    counter = CountAccumulator(spec, device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.nvtx.range_push(RANGE)
    ids, w = route_tokens(x, weights, spec, forced)
    backend.forward(x, weights, spec, ids, w)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.nvtx.range_pop()
    counter.add(ids)
    counts = counter.read()
    compulsory = traffic(spec, tokens, counts.expert_weight_bytes).compulsory
    Path(out).write_text(json.dumps({"compulsory_bytes": compulsory, "activated": counts.activated_experts}))
    return 0


if __name__ == "__main__":
    raise SystemExit(child_main(sys.argv[1:]))
