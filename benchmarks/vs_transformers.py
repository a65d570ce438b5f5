"""Every supported family against transformers' own MoE block: the relative error of each path's
output against transformers' (fp32, same weights, same input), whether the same experts were
chosen, whether FlopCounterMode over transformers' eager block counts the project's useful FLOPs,
and which layer features the config reader found. The figures tests/test_vs_transformers.py
asserts on (< 1e-5), tabulated.

    python benchmarks/vs_transformers.py [FAMILY ...]

Needs transformers (the ``test`` extra pins it). Writes
benchmarks/results/vs-transformers-<date>-<cpu>.{md,json} (atomically).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests package: the tiny models

import torch
from results_file import RESULTS, command, stem

from moecap_kernels.backends import get_backend
from moecap_kernels.counters import CountAccumulator
from moecap_kernels.files import write_atomic
from moecap_kernels.hardware import detect_device
from moecap_kernels.metrics import work
from moecap_kernels.reference import reference_forward, relative_error
from moecap_kernels.routing import route_tokens
from moecap_kernels.spec import MoESpec
from tests.transformers_models import FAMILIES, TOKENS, case

PATHS = ("reference", "loop", "grouped", "cpu_fused", "triton")
SHAPE = {"name", "hidden_size", "intermediate_size", "num_experts", "top_k", "shared_intermediate_size",
         "weight_dtype", "act_dtype", "source"}  # fmt: skip
DEFAULTS = MoESpec(name="defaults", hidden_size=1, intermediate_size=1, num_experts=1, top_k=1)


def features(spec: MoESpec) -> str:
    """The layer's semantics fields that differ from the plain Mixtral layer's, as field=value."""
    shown = []
    for field in dataclasses.fields(MoESpec):
        value = getattr(spec, field.name)
        if field.name not in SHAPE and value != getattr(DEFAULTS, field.name):
            shown.append(field.name if value is True else f"{field.name}={value}")
    return ", ".join(shown) or "(Mixtral's)"


def family_row(name: str) -> dict:
    """One family's comparison: errors per path, same top-k sets, FLOP counts, features."""
    c = case(name)
    ids, w = route_tokens(c.x, c.weights, c.spec)
    same = sum(set(a) == set(b) for a, b in zip(ids.tolist(), c.hf_ids.tolist(), strict=True))
    errors: dict[str, float | str] = {}
    for path in PATHS:
        if path == "reference":
            y = reference_forward(c.x, c.weights, c.spec, ids, w)
        else:
            backend = get_backend(path)
            why_not = backend.availability(c.x.device, c.x.dtype) or backend.supports(c.spec)
            if why_not is not None:
                errors[path] = why_not
                continue
            y = backend.forward(c.x, c.weights, c.spec, ids, w)
        errors[path] = relative_error(y, c.hf_out)
    counter = CountAccumulator(c.spec, "cpu", use_extension=False)
    counter.add(ids)
    flops = work(c.spec, TOKENS, counter.read().per_forward().expert_flops)
    expected = flops.dense if c.family.dense_compute else flops.useful
    return {
        "family": name,
        "same_topk_sets": f"{same}/{TOKENS}",
        "rel_error": errors,
        "flop_counter": c.hf_flops,
        "project_flops": expected,
        "flops_counted": "dense" if c.family.dense_compute else "useful",
        "features": features(c.spec),
        "checkpoint_format": c.spec.checkpoint_format,
    }


def markdown(rows: list[dict], header: dict[str, str]) -> str:
    lines = [f"# Against transformers {header['transformers']} — {header['device']}", ""]
    lines += [f"- {key}: {value}" for key, value in header.items()]
    lines += [
        "",
        f"Each family: transformers' tiny random model (fp32, weights at a trained layer's scale), saved "
        f"with save_pretrained and read back by the project's config reader and checkpoint loader; "
        f"{TOKENS} tokens through transformers' MoE block (eager experts) and through each path. rel. "
        "error = ‖y − y_transformers‖ / ‖y_transformers‖; FLOPs = FlopCounterMode over transformers' "
        "block vs the project's useful FLOPs from the counted routing (Llama 4 runs every expert on "
        "every token: there the dense figure).",
        "",
        "| family | same top-k sets | " + " | ".join(PATHS) + " | FLOPs (transformers = ours) | features |",
        "| --- | ---: | " + " | ".join("---:" for _ in PATHS) + " | --- | --- |",
    ]
    for r in rows:
        errors = [e if isinstance(e, str) else f"{e:.1e}" for e in r["rel_error"].values()]
        match = "yes" if r["flop_counter"] == r["project_flops"] else "**no**"
        flops = f"{r['flop_counter']:,} ({r['flops_counted']}): {match}"
        lines.append(f"| {r['family']} | {r['same_topk_sets']} | " + " | ".join(errors) + f" | {flops} | "
                     f"{r['features']} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("families", nargs="*", choices=[[], *FAMILIES], metavar="FAMILY")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    os.environ.setdefault("TRITON_INTERPRET", "1")  # the triton backend's kernels, run on the CPU
    import transformers

    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    rows = []
    for name in args.families or FAMILIES:
        rows.append(family_row(name))
        worst = max((e for e in rows[-1]["rel_error"].values() if not isinstance(e, str)), default=0.0)
        print(f"{name:18s} same sets {rows[-1]['same_topk_sets']:>6s}  worst rel. error {worst:.1e}")
    device = detect_device(torch.device("cpu"))
    header = {
        "date": dt.date.today().isoformat(),
        "device": device.name,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "command": command("vs_transformers.py", argv),
    }
    base = stem(args.out, "vs-transformers", device.name)
    write_atomic(base.with_suffix(".md"), markdown(rows, header))
    write_atomic(base.with_suffix(".json"), json.dumps({**header, "families": rows}, indent=1) + "\n")
    print(f"wrote {base}.md and .json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
