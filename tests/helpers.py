"""Small layers and an independent per-pair float64 loop, shared by the tests."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from moecap_kernels.spec import MoESpec


def tiny_spec(**overrides) -> MoESpec:
    base = dict(name="tiny", hidden_size=48, intermediate_size=40, num_experts=8, top_k=2)
    return MoESpec(**{**base, **overrides})


def tiny_config(folder: Path, *, hidden=64, inter=48, experts=8, top_k=2, **extra) -> Path:
    """A Mixtral-layout config.json for a layer small enough to run in a blink."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "model_type": "mixtral",
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_local_experts": experts,
        "num_experts_per_tok": top_k,
        "torch_dtype": "float32",
        **extra,
    }
    path = folder / "config.json"
    path.write_text(json.dumps(config))
    return path


NOT_LAYER = ("name", "weight_dtype", "act_dtype", "source", "checkpoint_format")


def spec_layer(spec: MoESpec) -> dict:
    """Every field that defines the layer's computation (all but name, dtypes, source, format)."""
    return {k: v for k, v in spec.to_dict().items() if k not in NOT_LAYER}


def spec_shape(spec: MoESpec) -> tuple:
    """The layer-shape fields of a spec (everything but name, dtypes and source), for comparisons."""
    return (
        spec.hidden_size,
        spec.intermediate_size,
        spec.num_experts,
        spec.top_k,
        spec.num_shared_experts,
        spec.shared_intermediate_size,
        spec.router_scoring,
        spec.renormalize,
    )


def align_reference(
    topk_ids: list[list[int]], num_experts: int, block_m: int
) -> tuple[list[int], list[int], int]:
    """The alignment contract (kernels/align.py) on Python lists: (sorted_pair_ids, block_expert_ids,
    num_padded). Pairs grouped by expert in pair order, each group padded to a multiple of block_m."""
    flat = [e for row in topk_ids for e in row]
    n_pairs = len(flat)
    bound = n_pairs + min(num_experts, n_pairs) * (block_m - 1)
    max_padded = -(-bound // block_m) * block_m
    pairs_of: dict[int, list[int]] = {}
    for p, e in enumerate(flat):
        pairs_of.setdefault(e, []).append(p)
    rows: list[int] = []
    blocks: list[int] = []
    for e in sorted(pairs_of):
        segment = pairs_of[e] + [n_pairs] * (-len(pairs_of[e]) % block_m)
        rows += segment
        blocks += [e] * (len(segment) // block_m)
    num_padded = len(rows)
    rows += [n_pairs] * (max_padded - num_padded)
    blocks += [-1] * (max_padded // block_m - len(blocks))
    return rows, blocks, num_padded


def per_pair_reference(x, weights, spec, topk_ids, topk_weights) -> torch.Tensor:
    """y in float64 by the definition: for every token, for every routed pair, one expert matvec
    (biases, activation, weights on input or output, gated shared experts as the spec says)."""

    def act(gate: float, up: float | None) -> float:
        if spec.activation == "swiglu_oai":
            g, u = min(gate, spec.swiglu_limit), max(-spec.swiglu_limit, min(up, spec.swiglu_limit))
            return (u + 1) * g / (1 + math.exp(-spec.swiglu_alpha * g))
        if spec.activation == "silu":
            a = gate / (1 + math.exp(-gate))
        elif spec.activation == "gelu":
            a = 0.5 * gate * (1 + math.erf(gate / math.sqrt(2)))
        else:
            a = 0.5 * gate * (1 + math.tanh(math.sqrt(2 / math.pi) * (gate + 0.044715 * gate**3)))
        return a if up is None else a * up

    def expert(row, w_in, w_out, width, b_in=None, b_out=None):
        h = (w_in.double() @ row).tolist()
        if b_in is not None:
            h = [v + b for v, b in zip(h, b_in.double().tolist(), strict=True)]
        inner = [act(h[i], h[width + i] if spec.gated else None) for i in range(width)]
        out = w_out.double() @ torch.tensor(inner, dtype=torch.float64)
        return out if b_out is None else out + b_out.double()

    y = torch.zeros(x.shape, dtype=torch.float64)
    f = spec.intermediate_size
    for t in range(x.shape[0]):
        row = x[t].double()
        for j in range(spec.top_k):
            e, w = int(topk_ids[t, j]), float(topk_weights[t, j])
            biases = (weights.w_in_bias[e], weights.w_out_bias[e]) if spec.expert_bias else (None, None)
            if spec.weights_on_input:
                y[t] += expert(row * w, weights.w_in[e], weights.w_out[e], f, *biases)
            else:
                y[t] += w * expert(row, weights.w_in[e], weights.w_out[e], f, *biases)
        for s in range(spec.num_shared_experts):
            fs = spec.shared_intermediate_size
            gate = 1.0
            if spec.shared_expert_gate:
                gate = 1 / (1 + math.exp(-float(weights.shared_gate[s].double() @ row)))
            y[t] += gate * expert(row, weights.shared_w_in[s], weights.shared_w_out[s], fs)
    return y
