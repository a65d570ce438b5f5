"""The exact traffic of expert parallelism: routed pairs from each source rank to each expert's rank.

A source rank's pairs are keyed by (destination rank, local expert there); ``pair_counts`` is the
[N, L] histogram of those keys, computed on the device. Its row sums are that source's row of the
N×N traffic matrix; the receivers get the [N, L] counts in the count exchange of the dispatch, so
no per-row expert id travels. Bytes follow exactly: every pair moves one activation row of H
elements to its expert's rank (dispatch) and one output row back (combine).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moecap_kernels.ep.placement import Placement
from moecap_kernels.spec import MoESpec


@dataclass(frozen=True)
class DestinationTables:
    """For one source rank: [E] destination rank and [E] local expert index there, on the device."""

    rank: torch.Tensor
    local: torch.Tensor
    ranks: int
    max_local: int

    @classmethod
    def build(cls, placement: Placement, source: int, device: torch.device) -> DestinationTables:
        rank, local = placement.destination_table(source)
        as_tensor = lambda v: torch.tensor(v, dtype=torch.int64, device=device)  # noqa: E731
        return cls(as_tensor(rank), as_tensor(local), placement.ranks, placement.max_local_experts)

    def keys(self, topk_ids: torch.Tensor) -> torch.Tensor:
        """int64 [T·k]: destination rank · L + local index, for each pair in row-major order."""
        flat = topk_ids.reshape(-1)
        return self.rank[flat] * self.max_local + self.local[flat]

    def pair_counts(self, keys: torch.Tensor) -> torch.Tensor:
        """int64 [N, L]: the pairs for each (destination rank, local expert)."""
        return torch.bincount(keys, minlength=self.ranks * self.max_local).view(self.ranks, self.max_local)


def dispatch_counts(topk_ids_by_source: list[torch.Tensor], placement: Placement) -> torch.Tensor:
    """int64 [N sources, N ranks, L]: the pairs each source sends to each rank's local experts.

    Counting only: what the projection needs for any N on one machine, no expert computed.
    """
    per_source = []
    for source, ids in enumerate(topk_ids_by_source):
        tables = DestinationTables.build(placement, source, ids.device)
        per_source.append(tables.pair_counts(tables.keys(ids)))
    return torch.stack(per_source)


def traffic_matrix(topk_ids_by_source: list[torch.Tensor], placement: Placement) -> list[list[int]]:
    """The N×N matrix of routed pairs, row = source rank, column = expert's rank (exact ints)."""
    return dispatch_counts(topk_ids_by_source, placement).sum(dim=2).tolist()


def row_bytes(spec: MoESpec) -> int:
    """Bytes of one activation (or output) row: what each routed pair moves each way."""
    return spec.hidden_size * spec.act_bytes_per_element


def scaled(matrix: list[list[int]], factor: int) -> list[list[int]]:
    return [[v * factor for v in row] for row in matrix]


def balancedness(received: list[int]) -> float:
    """mean / max of the pairs received per rank: 1.0 is perfectly balanced (0.0 if none)."""
    top = max(received)
    return sum(received) / len(received) / top if top else 0.0


def off_rank(matrix: list[list[int]]) -> tuple[list[int], list[int]]:
    """(sent to other ranks, received from other ranks) per rank: what crosses a link."""
    n = len(matrix)
    sent = [sum(matrix[r][c] for c in range(n) if c != r) for r in range(n)]
    received = [sum(matrix[s][r] for s in range(n) if s != r) for r in range(n)]
    return sent, received
