"""align_tokens against a plain-Python reference: exact tensors, on random and edge-case routings."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moecap_kernels.kernels.align import align_tokens, max_padded_rows
from tests.helpers import align_reference


def check(ids: list[list[int]], num_experts: int, block_m: int, top_k: int) -> None:
    topk_ids = torch.tensor(ids, dtype=torch.int64).reshape(len(ids), top_k)
    rows, owners, num_padded = align_reference(ids, num_experts, block_m)
    num_pairs = len(ids) * top_k
    max_padded = max_padded_rows(num_pairs, num_experts, block_m)
    looser = -(-(num_pairs + num_experts * (block_m - 1)) // block_m) * block_m  # T·k + E·(block_m − 1)
    assert num_padded <= max_padded <= looser and len(rows) == max_padded
    for use_extension in (False, None):  # the torch path, and the compiled op where it is built
        got = align_tokens(topk_ids, num_experts, block_m, use_extension=use_extension)
        assert got.sorted_pair_ids.dtype == torch.int32 and got.block_expert_ids.dtype == torch.int32
        assert got.num_padded.dtype == torch.int32 and got.num_padded.shape == (1,)
        assert got.sorted_pair_ids.tolist() == rows
        assert got.block_expert_ids.tolist() == owners
        assert got.num_padded.item() == num_padded
        assert got.max_padded % block_m == 0 and got.max_blocks * block_m == got.max_padded


@st.composite
def routings(draw):
    num_experts = draw(st.integers(1, 16))
    top_k = draw(st.integers(1, min(4, num_experts)))
    tokens = draw(st.integers(1, 40))
    distinct = draw(st.booleans())
    if distinct:  # as a router gives: k distinct experts per token
        ids = [draw(st.permutations(range(num_experts)))[:top_k] for _ in range(tokens)]
    else:
        ids = draw(
            st.lists(
                st.lists(st.integers(0, num_experts - 1), min_size=top_k, max_size=top_k),
                min_size=tokens,
                max_size=tokens,
            )
        )
    block_m = draw(st.sampled_from([1, 2, 3, 16, 64]))
    return ids, num_experts, block_m, top_k


@settings(max_examples=150, deadline=None)
@given(routings())
def test_align_matches_reference(case):
    ids, num_experts, block_m, top_k = case
    check(ids, num_experts, block_m, top_k)


@pytest.mark.parametrize("block_m", [1, 16, 64])
@pytest.mark.parametrize(
    ("ids", "num_experts"),
    [
        ([[3]], 8),  # one token
        ([[5, 0]], 6),  # one token, k = 2
        ([[2]] * 37, 4),  # every token to one expert
        ([[1, 1]] * 5, 2),  # repeated ids still align
        ([[t % 8, (t + 3) % 8] for t in range(20)], 8),  # every expert hit
        ([[0, 1, 2, 3]] * 9, 4),  # k = E
        ([[4, 0, 2, 1, 3]], 5),  # k = E, one token
    ],
)
def test_align_edge_cases(ids, num_experts, block_m):
    check(ids, num_experts, block_m, len(ids[0]))


def test_align_no_tokens():
    got = align_tokens(torch.empty((0, 2), dtype=torch.int64), 4, 16)
    assert got.max_padded == 0 and got.max_blocks == 0 and got.num_padded.tolist() == [0]


def test_max_padded_rows_bounds():
    assert max_padded_rows(8, 256, 16) == 128  # decode: 8 pairs can waste at most 8 · 15 rows
    assert max_padded_rows(4096, 8, 64) == 4608  # 4096 + 8 · 63, rounded up to a multiple of 64
    with pytest.raises(ValueError):
        max_padded_rows(4, 0, 16)
