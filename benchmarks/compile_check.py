"""Compile the triton backend's kernel set ahead of time for Hopper (sm_90) and Ampere (sm_80) on a
machine without a GPU, with Triton's own compiler, and check each kernel: it compiles, its shared
memory fits the target, it does not spill registers on sm_90 (spills on sm_80 are listed).

    python benchmarks/compile_check.py [--full] [--arch 90,80] [--models a,b] [--markdown FILE]

Default set: Mixtral-8x7B, Qwen3-30B-A3B and DeepSeek-V3, T = 1 … 4096 (powers of two), bf16 and
fp16, unquantized and each model's own format, counters on and off, both combines. ``--full``: every
preset and every weight format. Exit 1 when any kernel fails the check. tests/test_compile_check.py
runs a subset of the same in CI.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

from moecap_kernels.kernels.compile_check import compile_launch, kernel_set
from moecap_kernels.quant.formats import ALL_FORMATS
from moecap_kernels.spec import list_presets

DEFAULT_MODELS = ("mixtral-8x7b", "qwen3-30b-a3b", "deepseek-v3")
TOKENS = tuple(2**i for i in range(13))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--full", action="store_true", help="every preset and every weight format")
    p.add_argument("--arch", default="90,80", help="compute capabilities × 10, comma list (default 90,80)")
    p.add_argument("--models", help="comma list of presets (default: three; --full: all)")
    p.add_argument(
        "--formats", help="comma list of weight formats, or all (default: none and each model's own)"
    )
    p.add_argument("--tokens", help="comma list of T (default: 1, 2, 4, …, 4096)")
    p.add_argument(
        "--dtypes", default="bfloat16,float16", help="activation dtypes (default bfloat16,float16)"
    )
    p.add_argument("--plain", action="store_true", help="counters off and the atomic combine only")
    p.add_argument("--markdown", help="write the summary as Markdown")
    args = p.parse_args(argv)
    models = args.models.split(",") if args.models else (list_presets() if args.full else DEFAULT_MODELS)
    formats = ALL_FORMATS if args.full or args.formats == "all" else None
    if args.formats and args.formats != "all":
        formats = tuple(args.formats.split(","))
    tokens = tuple(int(t) for t in args.tokens.split(",")) if args.tokens else TOKENS
    plain = {"counts": (False,), "atomics": (True,)}
    variants = plain if args.plain else {"counts": (False, True), "atomics": (True, False)}
    lines, failed = [], 0
    for arch in (int(a) for a in args.arch.split(",")):
        start = time.perf_counter()
        launches = kernel_set(models, tokens, arch, dtypes=tuple(args.dtypes.split(",")), formats=formats,
                              **variants)  # fmt: skip
        results = [compile_launch(launch, arch) for launch in launches]
        seconds = time.perf_counter() - start
        bad = [r for r in results if r.problems]
        spills = [r for r in results if r.spill_bytes]
        shared = max((r.shared_bytes or 0) for r in results)
        failed += len(bad)
        lines.append(
            f"sm_{arch}: {len(results)} kernels compiled in {seconds:.0f} s; {len(bad)} fail the check; "
            f"{len(spills)} spill (largest stack {max((r.spill_bytes for r in spills), default=0)} B); "
            f"most shared memory {shared} B"
        )
        for r in bad + [r for r in spills if r not in bad]:
            where = ", ".join(r.launch.where[:3]) + (" …" if len(r.launch.where) > 3 else "")
            verdict = "; ".join(r.problems) or f"spills {r.spill_bytes} B (reported, allowed on sm_{arch})"
            lines.append(
                f"  {r.launch.label}: {verdict} [{r.registers} regs, {r.shared_bytes} B shared] at {where}"
            )
    print("\n".join(lines))
    if args.markdown:
        command = "python benchmarks/compile_check.py " + " ".join(argv if argv is not None else sys.argv[1:])
        Path(args.markdown).write_text(
            f"# Compile check\n\n`{command}`\n\n```\n" + "\n".join(lines) + "\n```\n"
        )
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
