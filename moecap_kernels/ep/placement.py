"""Which rank holds which expert: ``expert_ranks[e]`` lists the ranks holding a copy of expert e.

The default is contiguous: E/N experts per rank (the first E mod N ranks one more). A ``--placement``
JSON file may give any map, redundant copies of hot experts included (as EPLB does):
``{"expert_ranks": [[0], [0], [1], [1, 0], ...]}``, one list per expert.

A token on source rank s sends its pair for expert e to the copy on s itself when s holds one, else to
copy number ``s mod len(copies)``: deterministic, and it spreads the sources over the copies.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from moecap_kernels.errors import UserError
from moecap_kernels.files import read_json
from moecap_kernels.limits import MAX_SMALL_FILE_BYTES


@dataclass(frozen=True)
class Placement:
    """``expert_ranks[e]``: the ranks holding expert e, each rank in [0, ranks); every expert placed."""

    ranks: int
    expert_ranks: tuple[tuple[int, ...], ...]
    source: str = "contiguous"

    def __post_init__(self) -> None:
        for e, copies in enumerate(self.expert_ranks):
            if not copies:
                raise UserError(f"placement {self.source}: expert {e} is on no rank")
            for r in copies:
                if isinstance(r, bool) or not isinstance(r, int) or not 0 <= r < self.ranks:
                    raise UserError(
                        f"placement {self.source}: expert {e} on rank {r!r}, out of range [0, {self.ranks})"
                    )
            if len(set(copies)) != len(copies):
                raise UserError(f"placement {self.source}: expert {e} lists rank {copies} twice")
        empty = [r for r in range(self.ranks) if not self.experts_of_rank[r]]
        if empty:
            raise UserError(f"placement {self.source}: rank {empty[0]} holds no expert")

    @property
    def num_experts(self) -> int:
        return len(self.expert_ranks)

    @cached_property
    def experts_of_rank(self) -> tuple[tuple[int, ...], ...]:
        """Each rank's experts (global ids, ascending): its local experts 0, 1, … in that order."""
        held: list[list[int]] = [[] for _ in range(self.ranks)]
        for e, copies in enumerate(self.expert_ranks):
            for r in copies:
                held[r].append(e)
        return tuple(tuple(h) for h in held)

    @property
    def max_local_experts(self) -> int:
        return max(len(h) for h in self.experts_of_rank)

    @property
    def redundant_copies(self) -> int:
        """Copies beyond one per expert."""
        return sum(len(c) for c in self.expert_ranks) - self.num_experts

    def destination(self, source: int, expert: int) -> tuple[int, int]:
        """(rank, local index there) that source rank ``source`` sends its pairs for ``expert`` to."""
        copies = self.expert_ranks[expert]
        rank = source if source in copies else copies[source % len(copies)]
        return rank, self.experts_of_rank[rank].index(expert)

    def destination_table(self, source: int) -> tuple[list[int], list[int]]:
        """([E] destination rank, [E] local index there) of every expert, for one source rank."""
        pairs = [self.destination(source, e) for e in range(self.num_experts)]
        return [p[0] for p in pairs], [p[1] for p in pairs]

    def to_dict(self) -> dict[str, object]:
        return {
            "source": self.source,
            "experts_of_rank": [list(h) for h in self.experts_of_rank],
            "redundant_copies": self.redundant_copies,
        }


def contiguous(num_experts: int, ranks: int) -> Placement:
    """E/N consecutive experts per rank; the first E mod N ranks hold one more."""
    if ranks > num_experts:
        raise UserError(f"--ep {ranks}: more ranks than the layer's {num_experts} experts")
    base, extra = divmod(num_experts, ranks)
    owner = [r for r in range(ranks) for _ in range(base + (r < extra))]
    return Placement(ranks, tuple((r,) for r in owner))


def load_placement(path: Path, num_experts: int, ranks: int) -> Placement:
    """A ``--placement`` file, checked against the layer (E experts) and the number of ranks."""
    where = str(path)
    data = read_json(path, f"placement {where}", MAX_SMALL_FILE_BYTES)
    copies = data.get("expert_ranks") if isinstance(data, dict) else None
    if not isinstance(copies, list) or not all(isinstance(c, list) for c in copies):
        raise UserError(
            f'placement {where}: expected {{"expert_ranks": [[rank, ...], ...]}}, one list per expert'
        )
    if len(copies) != num_experts:
        what = "misses experts" if len(copies) < num_experts else "lists more experts than there are"
        raise UserError(f"placement {where}: {len(copies)} lists for {num_experts} experts ({what})")
    return Placement(ranks, tuple(tuple(c) for c in copies), source=where)
