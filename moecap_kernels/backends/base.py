"""What every backend implements: the experts and combine of one MoE layer, given its routing.

The router (logits and top-k) is shared by all backends and runs outside them (see runner.BackendRun),
so that every backend sees identical routed pairs. A backend knows nothing of metrics.
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
import torch.nn.functional as F

from moecap_kernels.spec import MoESpec
from moecap_kernels.weights import MoEWeights


def activate(h_in: torch.Tensor, spec: MoESpec) -> torch.Tensor:
    """act(gate) * up for gated experts (h_in holds [gate | up] along the last dim), else act(h_in)."""
    act = F.silu if spec.activation == "silu" else F.gelu
    if not spec.gated:
        return act(h_in)
    gate, up = h_in.chunk(2, dim=-1)
    return act(gate) * up


def expert_mlp(x: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor, spec: MoESpec) -> torch.Tensor:
    """One expert on rows ``x`` [n, H]: down(act(gate x) * up x), in x's dtype."""
    return activate(x @ w_in.T, spec) @ w_out.T


@functools.lru_cache(maxsize=32)
def shared_routing(tokens: int, num_shared: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Shared experts as routing: ids [T, S] (every token to each shared expert) and weights of 1.

    Cached because forwards inside timed regions ask for it; callers must not modify the tensors.
    """
    ids = torch.arange(num_shared, device=device).expand(tokens, num_shared)
    return ids, torch.ones((tokens, num_shared), dtype=torch.float32, device=device)


# mlp(i, rows) -> expert i applied to rows [n, H]: how a backend runs one expert's GEMMs.
ExpertMLP = Callable[[int, torch.Tensor], torch.Tensor]


def add_shared_experts(
    y: torch.Tensor, x: torch.Tensor, weights: MoEWeights, spec: MoESpec, mlp: ExpertMLP | None = None
) -> torch.Tensor:
    """y += every shared expert applied to every token (shared experts are always active).

    ``mlp`` runs shared expert i (default: ``expert_mlp`` on ``weights.shared_w_in[i]`` and ``_out``).
    """
    for s in range(spec.num_shared_experts):
        if mlp is None:
            y += expert_mlp(x, weights.shared_w_in[s], weights.shared_w_out[s], spec)
        else:
            y += mlp(s, x)
    return y


class Backend(ABC):
    """An implementation of experts + combine, registered by ``name``."""

    name: str = ""
    description: str = ""

    def availability(self, device: torch.device, dtype: torch.dtype) -> str | None:
        """None when this backend runs on ``device`` with ``dtype``, else one line saying why not."""
        return None

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
