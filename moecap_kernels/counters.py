"""Exact expert-activation counters, accumulated on the routing's device.

``CountAccumulator.add(topk_ids)`` enqueues the counting of one forward's routing without a
host synchronisation (so it can sit inside a timed region); ``read()`` is the one place that
copies the int64 accumulator to the host. Two implementations give identical numbers: the
compiled ``moecap::count_routing`` op and a pure-torch fallback.

Accumulator layout, int64 [E + 6]: tokens per expert in [0, E), then ``STAT_FIELDS`` in order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moecap_kernels import _ext
from moecap_kernels.spec import MoESpec

STAT_FIELDS = (
    "activated_experts",
    "routed_pairs",
    "expert_weight_bytes",
    "expert_flops",
    "forwards",
    "invalid_ids",
)
_OP_NAME = "count_routing"


@dataclass(frozen=True)
class Counts:
    """Counts summed over ``forwards`` forwards; every field is an exact Python int.

    ``tokens_per_expert[e]`` is the number of routed (token, expert) pairs sent to expert e;
    ``activated_experts`` sums, over forwards, the experts hit at least once in that forward;
    ``expert_weight_bytes``/``expert_flops`` are the bytes of activated experts' weights and
    the routed-expert FLOPs (2 · P_e per pair); ``invalid_ids`` counts ids outside [0, E).
    """

    forwards: int
    tokens_per_expert: tuple[int, ...]
    activated_experts: int
    routed_pairs: int
    expert_weight_bytes: int
    expert_flops: int
    invalid_ids: int

    @classmethod
    def from_stats(cls, stats: list[int], num_experts: int) -> Counts:
        """Decodes a host copy of the accumulator (length E + len(STAT_FIELDS))."""
        if len(stats) != num_experts + len(STAT_FIELDS):
            raise ValueError(f"expected {num_experts + len(STAT_FIELDS)} stats, got {len(stats)}")
        totals = dict(zip(STAT_FIELDS, (int(v) for v in stats[num_experts:]), strict=True))
        return cls(tokens_per_expert=tuple(int(v) for v in stats[:num_experts]), **totals)

    def per_forward(self) -> Counts:
        """The counts of one forward, from counts summed over identical forwards (exact integers).

        Raises ValueError when a sum does not divide: the forwards did not all route alike.
        """
        if self.forwards <= 0:
            raise ValueError("no forwards counted")

        def one(value: int) -> int:
            if value % self.forwards:
                raise ValueError(f"routing changed between the {self.forwards} counted forwards")
            return value // self.forwards

        scalars = {name: one(getattr(self, name)) for name in STAT_FIELDS if name != "forwards"}
        return Counts(forwards=1, tokens_per_expert=tuple(one(n) for n in self.tokens_per_expert), **scalars)


class CountAccumulator:
    """Owns an int64 [E + 6] accumulator on ``device`` and adds each forward's routing to it.

    ``use_extension``: None uses the compiled op when it is loaded for this device, True
    requires it (RuntimeError with the reason otherwise), False forces the pure-torch path.
    """

    def __init__(self, spec: MoESpec, device: torch.device | str, use_extension: bool | None = None) -> None:
        self.spec = spec
        self.device = torch.device(device)
        self.num_experts = spec.num_experts
        self.expert_weight_bytes = spec.expert_weight_bytes
        self.expert_flops_per_pair = 2 * spec.params_per_expert
        self.implementation = "extension" if self._want_extension(use_extension) else "torch"
        self.stats = torch.zeros(self.num_experts + len(STAT_FIELDS), dtype=torch.int64, device=self.device)
        # The op's overload, looked up once: add() runs inside the timed loop.
        self._op = (
            getattr(getattr(torch.ops, _ext.LIB_NAMESPACE), _OP_NAME).default
            if self.implementation == "extension"
            else None
        )
        if self._op is None and use_extension is None and self.device.type == "cuda":
            from moecap_kernels import cupy_kernels  # the same CUDA kernel, compiled by NVRTC

            if cupy_kernels.available():
                self.implementation, self._op = "cupy (NVRTC)", cupy_kernels.count_routing

    def _want_extension(self, use_extension: bool | None) -> bool:
        if use_extension is False:
            return False
        available = _ext.has_op(_OP_NAME, self.device.type)
        if use_extension and not available:
            raise RuntimeError(
                f"compiled {_OP_NAME} unavailable on {self.device.type}: {_ext.extension_status()}"
            )
        return available

    def add(self, topk_ids: torch.Tensor) -> None:
        """Adds one forward's routing ``topk_ids`` [T, k] (integer, on ``device``). No host sync."""
        # The op checks the device itself. Skipping the Python checks for what the router produces
        # (2-D int64) keeps the call short where it runs, right after a forward that has left the
        # caches cold (a `.to()` that returns its input is still a dispatcher call).
        trusted = self._op is not None and topk_ids.dtype == torch.int64 and topk_ids.dim() == 2
        ids = topk_ids if trusted else self._check_ids(topk_ids)
        if self._op is not None:
            self._op(ids, self.stats, self.num_experts, self.expert_weight_bytes, self.expert_flops_per_pair)
        else:
            self._add_torch(ids)

    def _check_ids(self, topk_ids: torch.Tensor) -> torch.Tensor:
        """Validates shape/dtype/device (metadata only) and returns int64 ids."""
        if topk_ids.dim() != 2:
            raise ValueError(f"topk_ids must be 2-D [T, k], got shape {tuple(topk_ids.shape)}")
        if topk_ids.dtype.is_floating_point or topk_ids.dtype.is_complex or topk_ids.dtype == torch.bool:
            raise ValueError(f"topk_ids must be an integer tensor, got {topk_ids.dtype}")
        if topk_ids.device != self.stats.device:
            raise ValueError(f"topk_ids is on {topk_ids.device}, the accumulator on {self.stats.device}")
        # .to() is a dispatcher call even when it returns its input: skip it (add() runs in the timed loop)
        return topk_ids if topk_ids.dtype == torch.int64 else topk_ids.to(torch.int64)

    def _add_torch(self, ids: torch.Tensor) -> None:
        """Pure-torch twin of the op: a histogram with one extra bin for out-of-range ids.

        Only device-side ops (scatter_add_, comparisons, stack); the pair count ``n`` comes
        from the shape, so nothing waits for the device.
        """
        num_experts = self.num_experts
        flat = ids.reshape(-1)
        n = flat.numel()
        valid = (flat >= 0) & (flat < num_experts)
        bins = torch.where(valid, flat, num_experts)
        hist = torch.zeros(num_experts + 1, dtype=torch.int64, device=self.device)
        hist.scatter_add_(0, bins, torch.ones_like(bins))
        per_expert, invalid = hist[:num_experts], hist[num_experts]
        activated = (per_expert > 0).sum()
        routed = n - invalid
        totals = torch.stack(
            [
                activated,
                routed,
                activated * self.expert_weight_bytes,
                routed * self.expert_flops_per_pair,
                torch.ones_like(invalid),
                invalid,
            ]
        )
        self.stats[:num_experts] += per_expert
        self.stats[num_experts:] += totals

    def read(self) -> Counts:
        """The counts so far: the one host synchronisation."""
        return Counts.from_stats(self.stats.cpu().tolist(), self.num_experts)

    def reset(self) -> None:
        """Zeroes the accumulator (on the device, no sync)."""
        self.stats.zero_()
