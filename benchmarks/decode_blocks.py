"""M-blocks per activated expert (load amplification) and padded rows per routed pair (padding
waste) of the triton backend's decode configs, by plain counting of uniform routings at the real
shapes: the 16-row blocks of before against the heuristic's expert-sized ones. No kernel runs.

    python benchmarks/decode_blocks.py [--seeds 3]
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from moecap_kernels.kernels.configs import heuristic_config
from moecap_kernels.routing import parse_routing, synthetic_ids
from moecap_kernels.spec import load_preset

SHAPES = (("mixtral-8x7b", 64), ("qwen3-30b-a3b", 256), ("deepseek-v3", 512))


def blocks(rows: list[int], block_m: int) -> tuple[float, float]:
    """(M-blocks per activated expert, padded rows per routed pair) of experts with ``rows`` pairs."""
    hit = [n for n in rows if n]
    per_expert = [math.ceil(n / block_m) for n in hit]
    return sum(per_expert) / len(hit), sum(b * block_m for b in per_expert) / sum(hit)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=3)
    args = p.parse_args()
    print("| layer | T | seed | 16-row: amplification | padding | heuristic BM | amplification | padding |")
    print("|---|---|---|---|---|---|---|---|")
    for model, tokens in SHAPES:
        spec = load_preset(model)
        shape = (tokens, spec.num_experts, spec.top_k, spec.hidden_size, spec.intermediate_size)
        block_m = heuristic_config(*shape, 2, spec.gated).block_m
        for seed in range(args.seeds):
            ids = synthetic_ids(parse_routing("uniform"), tokens, spec, seed).reshape(-1).tolist()
            rows = [ids.count(e) for e in range(spec.num_experts)]
            old, new = blocks(rows, 16), blocks(rows, block_m)
            cells = (
                model,
                tokens,
                seed,
                f"{old[0]:.3f}",
                f"{old[1]:.2f}",
                block_m,
                f"{new[0]:.3f}",
                f"{new[1]:.2f}",
            )
            print("| " + " | ".join(map(str, cells)) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
