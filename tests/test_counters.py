"""Counters: both implementations (compiled op, pure torch) against a plain-Python loop reference."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moecap_kernels import _ext
from moecap_kernels.counters import STAT_FIELDS, CountAccumulator, Counts
from moecap_kernels.spec import MoESpec

REPO = Path(__file__).resolve().parent.parent
IMPLEMENTATIONS = ("torch", "extension")

# (E, k, H, F) shaped like shipped MoE layers; H and F only scale bytes and FLOPs.
PRESET_SHAPES = {
    "mixtral-like": (8, 2, 4096, 14336),
    "qwen3-moe-like": (128, 8, 2048, 768),
    "deepseek-v3-like": (256, 8, 7168, 2048),
    "olmoe-like": (64, 8, 2048, 1024),
}

Routing = list[list[int]]  # one forward: T rows of k expert ids


def make_spec(num_experts: int, top_k: int, hidden: int = 16, inter: int = 8) -> MoESpec:
    return MoESpec(
        name="test", hidden_size=hidden, intermediate_size=inter, num_experts=num_experts, top_k=top_k
    )


def reference_counts(spec: MoESpec, forwards: list[Routing]) -> Counts:
    """Obviously-correct loops over nested lists: the definition the kernels must match."""
    num_experts = spec.num_experts
    tokens = [0] * num_experts
    activated = routed = weight_bytes = flops = invalid = 0
    for routing in forwards:
        hit = set()
        for row in routing:
            for expert in row:
                if 0 <= expert < num_experts:
                    tokens[expert] += 1
                    hit.add(expert)
                    routed += 1
                    flops += 2 * spec.params_per_expert
                else:
                    invalid += 1
        activated += len(hit)
        weight_bytes += len(hit) * spec.expert_weight_bytes
    return Counts(
        forwards=len(forwards),
        tokens_per_expert=tuple(tokens),
        activated_experts=activated,
        routed_pairs=routed,
        expert_weight_bytes=weight_bytes,
        expert_flops=flops,
        invalid_ids=invalid,
    )


def accumulator(spec: MoESpec, implementation: str) -> CountAccumulator:
    """A CPU accumulator using ``implementation``; skips the extension case if it did not build."""
    if implementation == "extension" and not _ext.load_extension():
        pytest.skip(f"extension unavailable: {_ext.extension_status()}")
    acc = CountAccumulator(spec, "cpu", use_extension=implementation == "extension")
    assert acc.implementation == implementation
    return acc


def count(spec: MoESpec, implementation: str, forwards: list[Routing]) -> Counts:
    acc = accumulator(spec, implementation)
    for routing in forwards:
        acc.add(torch.tensor(routing, dtype=torch.int64).reshape(len(routing), -1))
    return acc.read()


def random_topk(num_tokens: int, num_experts: int, top_k: int, seed: int) -> Routing:
    """Distinct experts per token, as a real top-k router produces."""
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(num_tokens, num_experts, generator=gen)
    return scores.topk(top_k, dim=1).indices.tolist()


# --- random routings -------------------------------------------------------------------


@st.composite
def routings(draw: st.DrawFn) -> tuple[MoESpec, list[Routing]]:
    """A spec and 1-4 forwards of [T, k] ids, mostly in range, sometimes out of range."""
    num_experts = draw(st.integers(1, 300))
    top_k = draw(st.integers(1, min(num_experts, 8)))
    ids = st.one_of(
        st.integers(0, num_experts - 1),
        st.integers(0, num_experts - 1),
        st.integers(0, num_experts - 1),
        st.sampled_from([-1, -(2**40), num_experts, num_experts + 7, 2**62]),
    )
    forward = st.lists(st.lists(ids, min_size=top_k, max_size=top_k), min_size=1, max_size=24)
    return make_spec(num_experts, top_k), draw(st.lists(forward, min_size=1, max_size=4))


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=routings())
def test_random_routings_match_reference(implementation: str, case: tuple[MoESpec, list[Routing]]) -> None:
    spec, forwards = case
    assert count(spec, implementation, forwards) == reference_counts(spec, forwards)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("num_tokens", [1, 7, 64])
@pytest.mark.parametrize("shape", sorted(PRESET_SHAPES))
def test_preset_shapes_match_reference(implementation: str, shape: str, num_tokens: int) -> None:
    num_experts, top_k, hidden, inter = PRESET_SHAPES[shape]
    spec = make_spec(num_experts, top_k, hidden, inter)
    forwards = [random_topk(num_tokens, num_experts, top_k, seed) for seed in range(3)]
    assert count(spec, implementation, forwards) == reference_counts(spec, forwards)


# --- edge cases ------------------------------------------------------------------------

EDGE_CASES: dict[str, tuple[int, int, list[Routing]]] = {
    "one token": (8, 2, [[[3, 5]]]),
    "one expert, k=1": (1, 1, [[[0], [0], [0]]]),
    "all tokens to one expert": (16, 1, [[[9]] * 50]),
    "same expert twice in a row": (4, 2, [[[2, 2], [2, 2]]]),
    "every expert hit": (6, 2, [[[0, 1], [2, 3], [4, 5]]]),
    "k = E": (5, 5, [[[0, 1, 2, 3, 4], [4, 3, 2, 1, 0]]]),
    "several forwards": (4, 2, [[[0, 1]], [[1, 2], [2, 3]], [[3, 0]], [[1, 1]]]),
    "out-of-range ids": (4, 2, [[[-1, 0], [4, 3], [2**62, -(2**62)]], [[5, 5]]]),
    "only invalid ids": (3, 1, [[[3], [-3]]]),
}


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("case", sorted(EDGE_CASES))
def test_edge_cases_match_reference(implementation: str, case: str) -> None:
    num_experts, top_k, forwards = EDGE_CASES[case]
    spec = make_spec(num_experts, top_k)
    assert count(spec, implementation, forwards) == reference_counts(spec, forwards)


def test_out_of_range_ids_counted_only_as_invalid() -> None:
    spec = make_spec(4, 2)
    counts = count(spec, "torch", [[[-1, 0], [4, 3]]])
    assert counts.invalid_ids == 2
    assert counts.routed_pairs == 2
    assert counts.tokens_per_expert == (1, 0, 0, 1)
    assert counts.activated_experts == 2


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_accumulates_across_adds_and_resets(implementation: str) -> None:
    spec = make_spec(8, 2)
    first, second = random_topk(5, 8, 2, seed=1), random_topk(9, 8, 2, seed=2)
    acc = accumulator(spec, implementation)
    acc.add(torch.tensor(first))
    assert acc.read() == reference_counts(spec, [first])
    acc.add(torch.tensor(second))
    assert acc.read() == reference_counts(spec, [first, second])
    acc.reset()
    acc.add(torch.tensor(second))
    assert acc.read() == reference_counts(spec, [second])


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_accepts_int32_and_non_contiguous_ids(implementation: str) -> None:
    spec = make_spec(16, 4)
    routing = random_topk(10, 16, 4, seed=3)
    ids = torch.tensor(routing, dtype=torch.int32).t().contiguous().t()  # int32, column-major
    assert not ids.is_contiguous()
    acc = accumulator(spec, implementation)
    acc.add(ids)
    assert acc.read() == reference_counts(spec, [routing])


@pytest.mark.parametrize(
    "bad",
    [torch.zeros(6, dtype=torch.int64), torch.zeros(2, 3, dtype=torch.float32), torch.zeros(2, 3, 1)],
)
def test_rejects_bad_ids(bad: torch.Tensor) -> None:
    with pytest.raises(ValueError):
        CountAccumulator(make_spec(4, 2), "cpu", use_extension=False).add(bad)


def test_op_checks_its_arguments() -> None:
    if not _ext.load_extension():
        pytest.skip(f"extension unavailable: {_ext.extension_status()}")
    op = torch.ops.moecap.count_routing
    ids = torch.zeros(2, 2, dtype=torch.int64)
    with pytest.raises(RuntimeError, match="stats must be 1-D of size"):
        op(ids, torch.zeros(4 + 5, dtype=torch.int64), 4, 1, 1)
    with pytest.raises(RuntimeError, match="topk_ids must be int64"):
        op(ids.int(), torch.zeros(4 + 6, dtype=torch.int64), 4, 1, 1)
    with pytest.raises(RuntimeError, match="2-D"):
        op(ids.reshape(-1), torch.zeros(4 + 6, dtype=torch.int64), 4, 1, 1)


def test_torch_path_never_reads_device_values(monkeypatch: pytest.MonkeyPatch) -> None:
    """add() must not sync the host: any Python-level read of a tensor's value fails here."""
    acc = CountAccumulator(make_spec(8, 2), "cpu", use_extension=False)
    ids = torch.tensor(random_topk(6, 8, 2, seed=4))

    def forbidden(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("host sync in add()")

    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__index__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    acc.add(ids)
    monkeypatch.undo()
    assert acc.read() == reference_counts(acc.spec, [ids.tolist()])


def test_use_extension_true_without_op_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_ext, "has_op", lambda *_args: False)
    with pytest.raises(RuntimeError, match="count_routing unavailable"):
        CountAccumulator(make_spec(4, 2), "cpu", use_extension=True)
    assert CountAccumulator(make_spec(4, 2), "cpu").implementation == "torch"


# --- Counts ----------------------------------------------------------------------------


def test_counts_helpers() -> None:
    spec = make_spec(4, 2)
    counts = reference_counts(spec, [[[0, 1]], [[0, 2], [0, 9]]])
    with pytest.raises(ValueError, match="routing changed"):
        counts.per_forward()  # 3 and 2 routed pairs do not average to a whole forward
    twice = reference_counts(spec, [[[0, 2], [0, 9]], [[0, 2], [0, 9]]]).per_forward()
    assert (twice.forwards, twice.routed_pairs, twice.invalid_ids, twice.activated_experts) == (1, 3, 1, 2)
    assert twice.tokens_per_expert == (2, 0, 1, 0)
    assert counts.tokens_per_expert == (3, 1, 1, 0)
    assert {f.name for f in fields(Counts)} == {"tokens_per_expert", *STAT_FIELDS}
    stats = [*counts.tokens_per_expert, *(getattr(counts, name) for name in STAT_FIELDS)]
    assert Counts.from_stats(stats, 4) == counts


# --- build machinery -------------------------------------------------------------------


def test_build_hash_tracks_sources_and_flavour(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    csrc = tmp_path / "csrc"
    shutil.copytree(_ext.CSRC_DIR, csrc)
    monkeypatch.setattr(_ext, "CSRC_DIR", csrc)
    before = _ext._build_hash("cpu")
    assert _ext._build_hash("cuda") != before
    (csrc / "counts_cuda.h").write_text((csrc / "counts_cuda.h").read_text() + "\n// edit\n")
    assert _ext._build_hash("cpu") != before


def test_failed_build_falls_back_quietly(tmp_path: Path) -> None:
    """A source that does not compile gives the fallback, a one-line reason, and no compiler spam."""
    csrc = tmp_path / "csrc"
    csrc.mkdir()
    (csrc / "broken.cpp").write_text("this is not C++;\n")
    script = (
        "from pathlib import Path\n"
        "from moecap_kernels import _ext\n"
        f"_ext.CSRC_DIR = Path({str(csrc)!r})\n"
        "assert _ext.load_extension() is False\n"
        "assert not _ext.has_op('count_routing')\n"
        "print(_ext.extension_status())\n"
    )
    env = {**os.environ, "MOECAP_CACHE_DIR": str(tmp_path / "cache"), "PYTHONPATH": str(REPO)}
    env.pop("MOECAP_NO_EXTENSION", None)
    env.pop("MOECAP_VERBOSE_BUILD", None)
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("pure-torch fallback: cpu build failed"), lines


def test_no_extension_env_forces_fallback() -> None:
    env = {**os.environ, "MOECAP_NO_EXTENSION": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-m", "moecap_kernels._ext"], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0
    assert "pure-torch fallback: disabled by MOECAP_NO_EXTENSION" in result.stdout


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
def test_cuda_kernel_compiles_without_gpu(tmp_path: Path) -> None:
    """The .cu file needs only the CUDA toolkit: no GPU and no CUDA build of torch."""
    result = subprocess.run(
        ["nvcc", "-arch=sm_90", "-c", str(REPO / "csrc" / "counts_cuda.cu"), "-o", str(tmp_path / "c.o")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "c.o").stat().st_size > 0
