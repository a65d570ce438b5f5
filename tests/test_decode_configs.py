"""Decode configs read each activated expert's weights once: M-blocks sized to the rows an expert
has (``configs.decode_block_m``), checked by plain counting at the real shapes and by the kernels'
own counters in the interpreter."""

from __future__ import annotations

import math

import pytest
import torch

from moecap_kernels.backends.triton import TritonBackend
from moecap_kernels.kernels.configs import AMPERE, KernelConfig, decode_block_m, heuristic_config
from moecap_kernels.routing import parse_routing, synthetic_ids
from moecap_kernels.spec import load_preset
from moecap_kernels.weights import random_weights
from tests.helpers import tiny_spec


def m_blocks_per_expert(ids: torch.Tensor, num_experts: int, block_m: int) -> float:
    """M-blocks the alignment makes per activated expert (each re-reads the expert's weights)."""
    rows = [0] * num_experts
    for e in ids.reshape(-1).tolist():
        rows[e] += 1
    hit = [n for n in rows if n]
    return sum(math.ceil(n / block_m) for n in hit) / len(hit)


@pytest.mark.parametrize(
    ("model", "tokens"), [("mixtral-8x7b", 64), ("qwen3-30b-a3b", 256), ("deepseek-v3", 512)]
)
def test_decode_configs_read_each_expert_once(model, tokens):
    spec = load_preset(model)
    shape = (tokens, spec.num_experts, spec.top_k, spec.hidden_size, spec.intermediate_size)
    for seed in range(3):
        ids = synthetic_ids(parse_routing("uniform"), tokens, spec, seed)
        for arch in (90, 80):
            block_m = heuristic_config(*shape, 2, spec.gated, arch).block_m
            assert m_blocks_per_expert(ids, spec.num_experts, block_m) <= 1.05
        assert m_blocks_per_expert(ids, spec.num_experts, 16) >= 1.25  # the old 16-row blocks: about 1.4


def test_decode_block_m():
    assert [decode_block_m(r) for r in (0.1, 6, 6.5, 16, 17, 39, 48)] == [16, 16, 32, 32, 64, 64, 64]


def test_the_ampere_heuristic_avoids_the_spilling_tile():
    hopper = heuristic_config(4096, 8, 2, 4096, 14336, 2, True, 90)
    ampere = heuristic_config(4096, 8, 2, 4096, 14336, 2, True, 80)
    assert (hopper.block_m, hopper.block_n, hopper.block_k) == (128, 128, 64)
    assert ampere != hopper and ampere.source == "heuristic (sm_80)"
    assert any((v.block_m, v.block_n) == (ampere.block_m, ampere.block_n) for v in AMPERE.values())


@pytest.fixture
def interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def test_kernel_counters_see_one_read_per_expert(interpreter):
    spec = tiny_spec(hidden_size=32, intermediate_size=32, num_experts=8, top_k=2).with_dtype("float32")
    tokens = 64  # 16 rows per expert on average: the 16-row blocks read about 1.4 times
    weights = random_weights(spec, seed=2)
    ids = synthetic_ids(parse_routing("uniform"), tokens, spec, seed=5)
    x = torch.randn(tokens, spec.hidden_size, generator=torch.Generator().manual_seed(1))
    topk_weights = torch.full((tokens, spec.top_k), 0.5)
    compulsory = len(torch.unique(ids)) * spec.expert_weight_bytes

    def amplification(backend: TritonBackend) -> float:
        return (
            backend.kernel_counters(x, weights, spec, ids, topk_weights)["issued_weight_bytes"] / compulsory
        )

    heuristic = amplification(TritonBackend())
    sixteen = amplification(TritonBackend(config=KernelConfig(16, 32, 32)))
    assert heuristic == pytest.approx(m_blocks_per_expert(ids, 8, decode_block_m(16))) and heuristic <= 1.05
    assert sixteen == pytest.approx(m_blocks_per_expert(ids, 8, 16)) and sixteen >= 1.2


def test_dequantizing_gated_kernels_take_the_tiles_that_do_not_spill():
    from moecap_kernels.kernels.configs import AMPERE_QUANTIZED_GATED, QUANTIZED_GATED

    for tokens in (64, 2048, 8192):  # decode BM 32, prefill up to 256 rows per expert, and beyond
        dense = heuristic_config(tokens, 8, 2, 4096, 14336, 2, True, 90)
        hopper = heuristic_config(tokens, 8, 2, 4096, 14336, 2, True, 90, quantized=True)
        ampere = heuristic_config(tokens, 8, 2, 4096, 14336, 2, True, 80, quantized=True)
        assert hopper != dense and (hopper.block_m, hopper.block_n, hopper.block_k) in {
            (c.block_m, c.block_n, c.block_k) for c in QUANTIZED_GATED.values()
        }
        assert (ampere.block_m, ampere.block_n, ampere.block_k) in {
            (c.block_m, c.block_n, c.block_k)
            for c in (*QUANTIZED_GATED.values(), *AMPERE_QUANTIZED_GATED.values())
        }
    ungated = heuristic_config(64, 8, 2, 4096, 14336, 2, False, 90, quantized=True)
    assert ungated == heuristic_config(64, 8, 2, 4096, 14336, 2, False, 90)  # one weight tile: no change
