"""transformers' own MoE block of a preset's layer, holding the project's weights, to time beside the
project's backends (benchmarks/compare.py). Its router, experts and combine are transformers' code,
run by each experts implementation it offers (``eager``: its per-expert loop; ``grouped_mm``: the
default since transformers 5, on CPUs too; ``batched_mm``: weights gathered per routed pair).

The block shares the weights' storage where the layouts agree (the experts), so it costs no second
copy of the layer. Only needs transformers installed (the ``test`` extra pins it).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from moecap_kernels.spec import MoESpec
from moecap_kernels.weights import MoEWeights

# preset name prefix -> (config class, block module, block class)
FAMILIES = {
    "mixtral": ("MixtralConfig", "transformers.models.mixtral.modeling_mixtral", "MixtralSparseMoeBlock"),
    "qwen3": ("Qwen3MoeConfig", "transformers.models.qwen3_moe.modeling_qwen3_moe", "Qwen3MoeSparseMoeBlock"),
    "olmoe": ("OlmoeConfig", "transformers.models.olmoe.modeling_olmoe", "OlmoeSparseMoeBlock"),
    "deepseek-v2": (
        "DeepseekV2Config",
        "transformers.models.deepseek_v2.modeling_deepseek_v2",
        "DeepseekV2Moe",
    ),
}
IMPLEMENTATIONS = ("eager", "grouped_mm", "batched_mm")
BATCHED_MM_BYTES = 2 << 30  # batched_mm copies every routed pair's expert weights: refused beyond this


def family_of(name: str) -> str | None:
    return next((family for family in FAMILIES if name.startswith(family)), None)


def _config(family: str, spec: MoESpec, implementation: str):
    import transformers

    common = dict(
        hidden_size=spec.hidden_size, num_experts_per_tok=spec.top_k, experts_implementation=implementation
    )
    if family == "mixtral":
        kwargs = dict(intermediate_size=spec.intermediate_size, num_local_experts=spec.num_experts)
    elif family == "deepseek-v2":
        kwargs = dict(
            moe_intermediate_size=spec.intermediate_size,
            n_routed_experts=spec.num_experts,
            n_shared_experts=spec.num_shared_experts,
            routed_scaling_factor=spec.routed_scaling_factor,
        )
    else:
        width = "moe_intermediate_size" if family == "qwen3" else "intermediate_size"
        kwargs = {
            width: spec.intermediate_size,
            "num_experts": spec.num_experts,
            "norm_topk_prob": spec.renormalize,
        }
    return getattr(transformers, FAMILIES[family][0])(**common, **kwargs)


def why_not(name: str, spec: MoESpec, implementation: str, tokens: int) -> str | None:
    """None when transformers' block can be timed for this layer, else why not."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        return "transformers is not installed"
    if family_of(name) is None:
        return f"no transformers block wired up for {name}"
    gathered = tokens * spec.top_k * spec.expert_weight_bytes
    if implementation == "batched_mm" and gathered > BATCHED_MM_BYTES:
        return f"batched_mm would copy {gathered / 2**30:.0f} GiB of weights per forward"
    return None


def hf_block(
    name: str, spec: MoESpec, weights: MoEWeights, implementation: str
) -> Callable[[torch.Tensor], torch.Tensor]:
    """transformers' block of preset ``name`` with ``weights``; called on x [T, H], returns y [T, H]."""
    import importlib

    family = family_of(name)
    _, module, block_class = FAMILIES[family]
    block = getattr(importlib.import_module(module), block_class)(_config(family, spec, implementation))
    block = block.to(dtype=weights.w_in.dtype, device=weights.w_in.device).eval().requires_grad_(False)
    block.gate.weight.data = weights.router
    block.experts.gate_up_proj.data = weights.w_in  # [E, 2F, H], gate rows first: the same layout
    block.experts.down_proj.data = weights.w_out
    if family == "deepseek-v2" and spec.num_shared_experts:
        f = spec.shared_intermediate_size
        shared = block.shared_experts  # one MLP of width S·F_s: our S experts side by side
        shared.gate_proj.weight.data = weights.shared_w_in[:, :f].reshape(-1, spec.hidden_size).clone()
        shared.up_proj.weight.data = weights.shared_w_in[:, f:].reshape(-1, spec.hidden_size).clone()
        shared.down_proj.weight.data = (
            weights.shared_w_out.permute(1, 0, 2).reshape(spec.hidden_size, -1).clone()
        )

    def forward(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            out = block(x[None])
        return (out[0] if isinstance(out, tuple) else out).reshape(x.shape)

    return forward
