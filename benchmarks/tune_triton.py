"""Tune the Triton backend's launch configs for one layer shape and write them where the backend looks.

For each token count M, every candidate config runs the layer's routed experts (router routing,
same inputs for all candidates), timed with CUDA events (median of repetitions); the fastest
becomes the entry for M in ``moecap_kernels/configs/E=…,N=…,device_name=…,dtype=….json``.

    python benchmarks/tune_triton.py --model mixtral-8x7b --tokens 1,8,64,256,4096
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from collections.abc import Iterable
from pathlib import Path

import torch

from moecap_kernels.backends import get_backend
from moecap_kernels.dtypes import torch_dtype
from moecap_kernels.errors import UserError
from moecap_kernels.kernels.configs import (
    CONFIG_FOLDER,
    CONFIG_KEYS,
    KernelConfig,
    config_file_name,
    device_name,
    heuristic_config,
)
from moecap_kernels.report import write_atomic
from moecap_kernels.routing import route_tokens
from moecap_kernels.spec import MoESpec, load_preset
from moecap_kernels.timing import time_region
from moecap_kernels.weights import random_weights


def candidates(tokens: int, spec: MoESpec) -> Iterable[KernelConfig]:
    """The untuned heuristic's pick, then a small grid around what suits this many rows per expert
    (decode: small M; prefill: large); no launch parameters twice."""
    heuristic = heuristic_config(
        tokens,
        spec.num_experts,
        spec.top_k,
        spec.hidden_size,
        spec.intermediate_size,
        spec.act_bytes_per_element,
        spec.gated,
    )
    yield heuristic
    rows_per_expert = tokens * spec.top_k / spec.num_experts
    block_ms = (16, 32) if rows_per_expert <= 16 else (32, 64) if rows_per_expert <= 128 else (64, 128)
    for block_m, block_n, block_k, warps, stages in itertools.product(
        block_ms, (64, 128), (64, 128), (4, 8), (3, 4)
    ):
        config = KernelConfig(block_m, block_n, block_k, group_m=8 if block_m >= 64 else 1, num_warps=warps,
                              num_stages=stages)  # fmt: skip
        if config.as_list() != heuristic.as_list():
            yield config


def tune(
    spec: MoESpec, token_counts: list[int], device: torch.device, configs=candidates, reps: int = 20
) -> dict[int, tuple[KernelConfig, float]]:
    """The fastest config (and its median seconds) for each token count; UserError if none runs."""
    weights = random_weights(spec, device, seed=0)
    backend = get_backend("triton")
    best: dict[int, tuple[KernelConfig, float]] = {}
    for tokens in token_counts:
        gen = torch.Generator(device=device).manual_seed(tokens)
        x = torch.randn(tokens, spec.hidden_size, generator=gen, device=device).to(
            torch_dtype(spec.act_dtype)
        )
        ids, topk_weights = route_tokens(x, weights, spec)

        def forward(i: int, x=x, ids=ids, topk_weights=topk_weights) -> None:
            backend.forward(x, weights, spec, ids, topk_weights)

        tried = 0
        for config in configs(tokens, spec):
            tried += 1
            backend.config = config
            try:
                seconds = time_region(forward, device, warmup=2, reps=reps).median
            except Exception as exc:  # a config the compiler rejects (shared memory, registers): skip it
                print(f"  skip {config.as_list()}: {type(exc).__name__}", file=sys.stderr)
                continue
            if tokens not in best or seconds < best[tokens][1]:
                best[tokens] = (config, seconds)
        if tokens not in best:
            raise UserError(f"M={tokens}: all {tried} candidate configs failed (see the skip lines above)")
        config, seconds = best[tokens]
        print(f"M={tokens}: {dict(zip(CONFIG_KEYS, config.as_list(), strict=True))} {seconds * 1e6:.1f} µs")
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--tokens", default="1,8,64,256,1024,4096")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--out", default=str(CONFIG_FOLDER))
    args = parser.parse_args(argv)
    try:
        if not torch.cuda.is_available():
            raise UserError("tuning needs a CUDA GPU: timings from the Triton interpreter mean nothing")
        device = torch.device("cuda")
        spec = load_preset(args.model).with_dtype(args.dtype)
        best = tune(spec, [int(t) for t in args.tokens.split(",")], device, reps=args.reps)
    except UserError as exc:
        print(f"tune_triton: error: {exc}", file=sys.stderr)
        return 2
    name = config_file_name(spec.num_experts, spec.intermediate_size, device_name(device), spec.act_dtype)
    table = {
        str(m): dict(zip(CONFIG_KEYS, cfg.as_list(), strict=True)) for m, (cfg, _) in sorted(best.items())
    }
    Path(args.out).mkdir(parents=True, exist_ok=True)
    write_atomic(Path(args.out) / name, json.dumps(table, indent=2) + "\n")
    print(f"wrote {Path(args.out) / name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
