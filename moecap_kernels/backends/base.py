"""What every backend implements: the experts and combine of one MoE layer, given its routing.

The router (logits and top-k) is shared by all backends and runs outside them (see runner.BackendRun),
so that every backend sees identical routed pairs. A backend knows nothing of metrics.
"""

from __future__ import annotations

import functools
import re
from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
import torch.nn.functional as F

from moecap_kernels.spec import MoESpec
from moecap_kernels.weights import MoEWeights


def activate(h_in: torch.Tensor, spec: MoESpec) -> torch.Tensor:
    """act(gate) * up for gated experts (h_in holds [gate | up] along the last dim), else act(h_in).

    swiglu_oai (gpt-oss): gate clamped from above and up to ±limit, then (up + 1) · gate · σ(α · gate).
    """
    if spec.activation == "swiglu_oai":
        gate, up = h_in.chunk(2, dim=-1)
        gate = gate.clamp(max=spec.swiglu_limit)
        up = up.clamp(-spec.swiglu_limit, spec.swiglu_limit)
        return (up + 1) * (gate * torch.sigmoid(gate * spec.swiglu_alpha))
    act = {
        "silu": F.silu,
        "gelu": F.gelu,
        "gelu_tanh": functools.partial(F.gelu, approximate="tanh"),
    }[spec.activation]
    if not spec.gated:
        return act(h_in)
    gate, up = h_in.chunk(2, dim=-1)
    return act(gate) * up


# mlp(i, rows) -> expert i applied to rows [n, H]: how a backend runs one expert's GEMMs.
ExpertMLP = Callable[[int, torch.Tensor], torch.Tensor]


def expert_mlp(
    x: torch.Tensor,
    w_in: torch.Tensor,
    w_out: torch.Tensor,
    spec: MoESpec,
    b_in: torch.Tensor | None = None,
    b_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """One expert on rows ``x`` [n, H]: down(act(gate x + b) * (up x + b)) + b, in x's dtype."""
    return F.linear(activate(F.linear(x, w_in, b_in), spec), w_out, b_out)


def routed_mlp(weights: MoEWeights, spec: MoESpec) -> ExpertMLP:
    """Routed expert e on rows, with its biases when the spec has them (torch GEMMs)."""
    if not spec.expert_bias:
        return lambda e, rows: expert_mlp(rows, weights.w_in[e], weights.w_out[e], spec)
    return lambda e, rows: expert_mlp(
        rows, weights.w_in[e], weights.w_out[e], spec, weights.w_in_bias[e], weights.w_out_bias[e]
    )


def shared_weights(x: torch.Tensor, weights: MoEWeights, spec: MoESpec) -> torch.Tensor | None:
    """[T, S] float32 scales of the shared experts: σ(x · shared_gate[s]) when gated, else None (1)."""
    if not spec.shared_expert_gate:
        return None
    return torch.sigmoid((x @ weights.shared_gate.T).float())


@functools.lru_cache(maxsize=32)
def shared_routing(tokens: int, num_shared: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Shared experts as routing: ids [T, S] (every token to each shared expert) and weights of 1.

    Cached because forwards inside timed regions ask for it; callers must not modify the tensors.
    """
    ids = torch.arange(num_shared, device=device).expand(tokens, num_shared)
    return ids, torch.ones((tokens, num_shared), dtype=torch.float32, device=device)


def shared_as_routing(
    x: torch.Tensor, weights: MoEWeights, spec: MoESpec
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shared experts as a routing for kernels that take one: every token to each, weighted by its gate."""
    ids, ones = shared_routing(x.shape[0], spec.num_shared_experts, x.device)
    gates = shared_weights(x, weights, spec)
    return ids, ones if gates is None else gates


def add_shared_experts(
    y: torch.Tensor, x: torch.Tensor, weights: MoEWeights, spec: MoESpec, mlp: ExpertMLP | None = None
) -> torch.Tensor:
    """y += every shared expert applied to every token (scaled by its gate when the spec has one).

    ``mlp`` runs shared expert i (default: ``expert_mlp`` on ``weights.shared_w_in[i]`` and ``_out``).
    """
    gates = shared_weights(x, weights, spec)
    for s in range(spec.num_shared_experts):
        if mlp is None:
            out = expert_mlp(x, weights.shared_w_in[s], weights.shared_w_out[s], spec)
        else:
            out = mlp(s, x)
        y += out if gates is None else out * gates[:, s, None].to(out.dtype)
    return y


def weighted_expert(
    mlp: ExpertMLP, e: int, rows: torch.Tensor, scale: torch.Tensor, spec: MoESpec
) -> torch.Tensor:
    """Expert e on rows with their routing weights ``scale`` [n, 1] (in the rows' dtype): on the
    output, or on the input when the spec says so (Llama 4)."""
    if spec.weights_on_input:
        return mlp(e, rows * scale)
    return mlp(e, rows) * scale


class Backend(ABC):
    """An implementation of experts + combine, registered by ``name``.

    ``weight_formats``: the expert weight formats it computes (``quant/formats.py`` names; an
    ``int4-gN`` name stands for every group size); a backend reads ``weights.quantized`` for them.
    """

    name: str = ""
    description: str = ""
    weight_formats: tuple[str, ...] = ("none",)
    # True when it may compute from a copy of the weights it made (a packed layout): weights that
    # change in place (an expert cache's slots) then cost that copy again (``forget``)
    copies_weights: bool = False
    # Whether a forward never waits for the host (no .item(), .tolist(), nonzero): then a CUDA
    # graph can capture it and the timed figure is kernel time (``graphs``).
    graph_safe: bool = False

    def availability(self, device: torch.device, dtype: torch.dtype) -> str | None:
        """None when this backend runs on ``device`` with ``dtype``, else one line saying why not."""
        return None

    def supports(self, spec: MoESpec) -> str | None:
        """None when this backend computes every feature of ``spec``'s layer, else which it lacks."""
        return self.format_unsupported(spec)

    def format_unsupported(self, spec: MoESpec) -> str | None:
        """None when this backend computes experts in ``spec``'s weight format, else one line."""
        family = re.sub(r"-g\d+", "-gN", spec.weight_format)
        if family in self.weight_formats:
            return None
        if self.weight_formats == ("none",):
            return f"{self.name} computes unquantized experts only, not {spec.weight_format}"
        return f"{self.name} computes {', '.join(self.weight_formats)} experts, not {spec.weight_format}"

    def forget(self, weights: MoEWeights) -> None:  # noqa: B027 (optional hook)
        """Drop anything made from ``weights`` (a packed copy): their values were overwritten in place."""

    def prepare(self, weights: MoEWeights, spec: MoESpec, tokens: int) -> None:  # noqa: B027 (optional hook)
        """One-time work before timing forwards of ``tokens`` tokens (layout changes, autotuning).

        Default: nothing. A forward must still work without it.
        """

    def extra_memory_bytes(self, spec: MoESpec, tokens: int) -> int:
        """Memory this backend allocates beyond the weights and activations at ``tokens`` tokens."""
        return 0

    def kernel_counters(
        self,
        x: torch.Tensor,
        weights: MoEWeights,
        spec: MoESpec,
        topk_ids: torch.Tensor,
        topk_weights: torch.Tensor,
    ) -> dict[str, int] | None:
        """The work the kernels themselves counted in one (untimed) forward; None if not instrumented.

        Keys: ``block_m``, ``padded_rows``, ``executed_flops``, ``issued_weight_bytes``.
        """
        return None

    @abstractmethod
    def forward(
        self,
        x: torch.Tensor,
        weights: MoEWeights,
        spec: MoESpec,
        topk_ids: torch.Tensor,
        topk_weights: torch.Tensor,
    ) -> torch.Tensor:
        """y [T, H] in x's dtype: Σ_j topk_weights[t, j] · expert_{topk_ids[t, j]}(x[t]) + shared(x[t]).

        x: [T, H] activations; topk_ids: int64 [T, k]; topk_weights: float32 [T, k].
        """
