"""Triton kernels for one MoE layer and the routing layout they consume.

- ``align``: sort routed pairs by expert, padded per expert to BLOCK_M rows (torch only, no sync).
- ``grouped_gemm``: the gate/up (+activation) and down (+weighting, +combine) grouped GEMMs.
- ``combine``: the fixed-order reduction of per-pair rows used by the deterministic mode.
- ``ops``: those launchers as ``moecap::`` torch custom ops with fake impls and FLOP formulas.
- ``configs``: launch parameters, tuned JSON files first, else a heuristic.

Only ``align`` is imported here: it needs torch alone, the rest needs triton.
"""

from moecap_kernels.kernels.align import AlignedRouting, align_tokens, max_padded_rows

__all__ = ["AlignedRouting", "align_tokens", "max_padded_rows"]
