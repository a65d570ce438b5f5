"""Token alignment: group routed (token, slot) pairs by expert in blocks of ``block_m`` rows.

The grouped GEMM kernels walk the routed pairs in M-blocks that each belong to one expert. This
module builds that layout with plain torch ops that never synchronise with the host, so that a
forward can be captured in a CUDA graph and buffers are sized from static upper bounds alone.

Contract of :func:`align_tokens` (a compiled C++/CUDA version may later sit behind it; it must
produce bit-identical tensors):

- ``sorted_pair_ids`` int32 [max_padded]: flat pair indices ``t * k + j`` ordered by expert and,
  within an expert, by pair index (a stable sort). Expert ``e``'s segment starts at
  ``Σ_{e' < e} ceil(n_e' / block_m) · block_m`` and is padded up to a multiple of ``block_m`` with
  the sentinel ``T * k``; so is everything after the last segment.
- ``block_expert_ids`` int32 [max_padded // block_m]: the expert owning each M-block, ``-1`` for
  blocks past ``num_padded``.
- ``num_padded`` int32 [1] (a device tensor, never read on the host): ``Σ_e ceil(n_e / block_m) ·
  block_m``.

``max_padded`` is :func:`max_padded_rows`: ``T·k + min(E, T·k)·(block_m − 1)`` rounded up to a
multiple of ``block_m``. At most ``min(E, T·k)`` experts receive a pair and each wastes fewer than
``block_m`` rows, so this bounds ``num_padded``; it is tighter than ``T·k + E·(block_m − 1)`` when
few tokens meet many experts (decode), which keeps the grid and the intermediate buffer small.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class AlignedRouting:
    """The expert-sorted, block-padded layout of one routing (see the module docstring)."""

    sorted_pair_ids: torch.Tensor
    block_expert_ids: torch.Tensor
    num_padded: torch.Tensor

    @property
    def max_padded(self) -> int:
        return self.sorted_pair_ids.numel()

    @property
    def max_blocks(self) -> int:
        return self.block_expert_ids.numel()


def max_padded_rows(num_pairs: int, num_experts: int, block_m: int) -> int:
    """Static upper bound on the padded row count, a multiple of ``block_m``."""
    if num_pairs < 0 or num_experts <= 0 or block_m <= 0:
        raise ValueError(f"bad sizes: num_pairs={num_pairs}, num_experts={num_experts}, block_m={block_m}")
    bound = num_pairs + min(num_experts, num_pairs) * (block_m - 1)
    return -(-bound // block_m) * block_m


def align_tokens(
    topk_ids: torch.Tensor, num_experts: int, block_m: int, use_extension: bool | None = None
) -> AlignedRouting:
    """Sort the pairs of ``topk_ids`` (int [T, k], values in [0, num_experts)) by expert, padded per expert.

    Uses the compiled ``moecap::align_tokens`` (csrc/align.cpp, one pass instead of a dozen torch
    launches) when it is built for this device, else on CUDA the same kernels compiled by NVRTC
    (``cupy_kernels``, when CuPy is installed), else :func:`align_tokens_torch`; all produce the same
    tensors (``use_extension=False`` forces the torch path). Values outside [0, num_experts) are not
    checked on CUDA (that would need a host sync) and give undefined results.
    """
    if topk_ids.dim() != 2:
        raise ValueError(f"topk_ids must be [T, k], got shape {tuple(topk_ids.shape)}")
    chosen = use_extension is not None
    if use_extension is None:
        from moecap_kernels._ext import has_op

        use_extension = has_op("align_tokens", topk_ids.device.type)
    if not use_extension:
        if topk_ids.device.type == "cuda" and not chosen:
            from moecap_kernels import cupy_kernels  # the same CUDA kernels, compiled by NVRTC

            if cupy_kernels.available():
                return AlignedRouting(*cupy_kernels.align_tokens(topk_ids, num_experts, block_m))
        return align_tokens_torch(topk_ids, num_experts, block_m)
    return AlignedRouting(*torch.ops.moecap.align_tokens(topk_ids, num_experts, block_m))


def align_tokens_torch(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> AlignedRouting:
    """The pure-torch alignment: no host synchronisation, a static output size."""
    num_tokens, top_k = topk_ids.shape
    num_pairs = num_tokens * top_k
    device = topk_ids.device
    max_padded = max_padded_rows(num_pairs, num_experts, block_m)

    flat = topk_ids.reshape(-1).to(torch.int64)
    # Per-expert pair counts; scatter_add_ rather than bincount, which syncs on CUDA to size its output.
    counts = torch.zeros(num_experts, dtype=torch.int64, device=device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    padded_counts = (counts + (block_m - 1)) // block_m * block_m
    padded_end = torch.cumsum(padded_counts, 0)
    padded_start = padded_end - padded_counts
    start = torch.cumsum(counts, 0) - counts

    sorted_experts, order = torch.sort(flat, stable=True)
    rank = torch.arange(num_pairs, dtype=torch.int64, device=device) - start[sorted_experts]
    dest = padded_start[sorted_experts] + rank

    sorted_pair_ids = torch.full((max_padded,), num_pairs, dtype=torch.int32, device=device)
    sorted_pair_ids.scatter_(0, dest, order.to(torch.int32))

    block_starts = torch.arange(0, max_padded, block_m, dtype=torch.int64, device=device)
    owner = torch.searchsorted(padded_end, block_starts, right=True)
    block_expert_ids = torch.where(owner < num_experts, owner, -1).to(torch.int32)
    num_padded = padded_end[-1:].to(torch.int32)
    return AlignedRouting(sorted_pair_ids, block_expert_ids, num_padded)
