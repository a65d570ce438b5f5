"""The compiled ``moecap::align_tokens`` op (csrc/align.cpp): exact against a plain-Python reference
and against the torch ``align_tokens`` of moecap_kernels/kernels/align.py; the CUDA kernel file is
only compiled (no GPU needed)."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moecap_kernels import _ext
from moecap_kernels.kernels.align import align_tokens_torch
from tests.helpers import align_reference

Aligned = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
CSRC = Path(__file__).resolve().parent.parent / "csrc"


@pytest.fixture(scope="module")
def op() -> Callable[[torch.Tensor, int, int], Aligned]:
    if not _ext.has_op("align_tokens"):
        pytest.skip(f"align_tokens op not available: {_ext.extension_status()}")
    return torch.ops.moecap.align_tokens


def check(op: Callable[..., Aligned], topk_ids: torch.Tensor, num_experts: int, block_m: int) -> None:
    """The op matches the reference exactly, and align.py's torch version."""
    sorted_ids, blocks, num_padded = op(topk_ids, num_experts, block_m)
    want_rows, want_blocks, want_padded = align_reference(topk_ids.tolist(), num_experts, block_m)
    for got in (sorted_ids, blocks, num_padded):
        assert got.dtype == torch.int32 and got.device == topk_ids.device
    assert sorted_ids.tolist() == want_rows
    assert blocks.tolist() == want_blocks
    assert num_padded.tolist() == [want_padded]

    torch_out = align_tokens_torch(topk_ids, num_experts, block_m)
    torch_tensors = (torch_out.sorted_pair_ids, torch_out.block_expert_ids, torch_out.num_padded)
    for got, want in zip((sorted_ids, blocks, num_padded), torch_tensors, strict=True):
        assert want.dtype == got.dtype and torch.equal(got, want)


@st.composite
def routings(draw: st.DrawFn) -> tuple[torch.Tensor, int, int]:
    """Random [T, k] routings, some skewed onto a few hot experts, with mixed block sizes."""
    num_experts = draw(st.integers(1, 70))
    top_k = draw(st.integers(1, 8))
    num_tokens = draw(st.integers(0, 40))
    block_m = draw(st.sampled_from([1, 2, 3, 4, 7, 16, 64, 128]))
    hot = draw(st.integers(0, num_experts - 1))
    expert = st.one_of(st.integers(0, num_experts - 1), st.integers(hot, min(hot + 1, num_experts - 1)))
    flat = draw(st.lists(expert, min_size=num_tokens * top_k, max_size=num_tokens * top_k))
    dtype = draw(st.sampled_from([torch.int64, torch.int32]))
    return torch.tensor(flat, dtype=dtype).reshape(num_tokens, top_k), num_experts, block_m


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=routings())
def test_random_routings_match_reference(op, case: tuple[torch.Tensor, int, int]) -> None:
    topk_ids, num_experts, block_m = case
    check(op, topk_ids, num_experts, block_m)


@pytest.mark.parametrize("block_m", [1, 16, 64])
@pytest.mark.parametrize(
    "name",
    [
        "one_token",
        "one_token_k_eq_e",
        "all_to_one_expert",
        "every_expert_hit",
        "k_eq_e",
        "experts_not_hit",
        "no_tokens",
        "large_uniform",
    ],
)
def test_edge_cases(op, name: str, block_m: int) -> None:
    gen = torch.Generator().manual_seed(7)
    if name == "one_token":
        topk_ids, num_experts = torch.tensor([[3]]), 8
    elif name == "one_token_k_eq_e":
        topk_ids, num_experts = torch.randperm(6, generator=gen).reshape(1, 6), 6
    elif name == "all_to_one_expert":
        topk_ids, num_experts = torch.full((150, 2), 5), 8
    elif name == "every_expert_hit":
        num_experts = 16
        topk_ids = torch.cat([torch.arange(num_experts), torch.randint(0, num_experts, (50,), generator=gen)])
        topk_ids = topk_ids.reshape(-1, 2)
    elif name == "k_eq_e":
        num_experts = 4
        topk_ids = torch.stack([torch.randperm(num_experts, generator=gen) for _ in range(33)])
    elif name == "experts_not_hit":  # first, last and middle experts get no pair
        num_experts = 10
        topk_ids = torch.tensor([2, 3, 7, 2, 8, 3] * 11).reshape(-1, 3)
    elif name == "no_tokens":
        topk_ids, num_experts = torch.empty((0, 4), dtype=torch.int64), 8
    else:
        num_experts = 64
        topk_ids = torch.randint(0, num_experts, (1024, 8), generator=gen)
    check(op, topk_ids, num_experts, block_m)


def test_noncontiguous_input(op) -> None:
    topk_ids = torch.randint(0, 12, (8, 30), generator=torch.Generator().manual_seed(1))[:, ::3]
    assert not topk_ids.is_contiguous()
    check(op, topk_ids, 12, 4)


@pytest.mark.parametrize("bad_id", [-1, 8, 1 << 40])
def test_out_of_range_id_raises(op, bad_id: int) -> None:
    topk_ids = torch.tensor([[0, 1], [2, bad_id]])
    with pytest.raises(RuntimeError, match="outside"):
        op(topk_ids, 8, 16)


@pytest.mark.parametrize(
    ("topk_ids", "num_experts", "block_m", "message"),
    [
        (torch.zeros((2, 2), dtype=torch.int64), 0, 16, "num_experts"),
        (torch.zeros((2, 2), dtype=torch.int64), 4, 0, "block_m"),
        (torch.zeros(4, dtype=torch.int64), 4, 16, "2-D"),
        (torch.zeros((2, 2), dtype=torch.float32), 4, 16, "int64 or int32"),
    ],
)
def test_bad_arguments_raise(
    op, topk_ids: torch.Tensor, num_experts: int, block_m: int, message: str
) -> None:
    with pytest.raises(RuntimeError, match=message):
        op(topk_ids, num_experts, block_m)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found")
def test_cuda_kernel_compiles(tmp_path: Path) -> None:
    result = subprocess.run(
        ["nvcc", "-arch=sm_90", "-c", str(CSRC / "align_cuda.cu"), "-o", str(tmp_path / "align_cuda.o")],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
