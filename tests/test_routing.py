"""Routing: router top-k arithmetic, synthetic distributions, trace validation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from moecap_kernels.errors import UserError
from moecap_kernels.routing import (
    check_routing,
    load_trace,
    parse_routing,
    route,
    router_logits,
    synthetic_ids,
)
from moecap_kernels.spec import MoESpec
from moecap_kernels.weights import random_weights


def small_spec(**kw) -> MoESpec:
    base = dict(name="tiny", hidden_size=16, intermediate_size=8, num_experts=8, top_k=2)
    return MoESpec(**{**base, **kw})


@pytest.mark.parametrize("text", ["router", "uniform", "zipf:1.2", "dirichlet:0.3", "hot:2", "trace:x.npy"])
def test_parse_routing_accepts(text):
    assert parse_routing(text).describe() == text  # kind and parameter both survive the parse


@pytest.mark.parametrize(
    "text",
    ["zipf", "zipf:abc", "zipf:-1", "hot:1.5", "hot:0", "gauss:1", "trace:", "uniform:3", "dirichlet:nan"],
)
def test_parse_routing_rejects(text):
    with pytest.raises(UserError):
        parse_routing(text)


def _softmax(row: list[float]) -> list[float]:
    top = max(row)
    e = [math.exp(v - top) for v in row]
    return [v / sum(e) for v in e]


def _sigmoid(row: list[float]) -> list[float]:
    return [1 / (1 + math.exp(-v)) for v in row]


def _top(row: list[float], k: int, allowed: set[int] | None = None) -> list[int]:
    """The k best positions of ``row`` among ``allowed``, best first (ties: lower index, as torch here)."""
    candidates = [e for e in range(len(row)) if allowed is None or e in allowed]
    return sorted(candidates, key=lambda e: (-row[e], e))[:k]


@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_route_matches_plain_computation(scoring, renormalize):
    spec = small_spec(router_scoring=scoring, renormalize=renormalize, top_k=3)
    logits = torch.randn(5, 8)
    ids, weights = route(logits, spec)
    for t, row in enumerate(logits.tolist()):
        scores = _softmax(row) if scoring == "softmax" else _sigmoid(row)
        best = _top(scores, 3)
        assert ids[t].tolist() == best
        expected = [scores[e] for e in best]
        if renormalize:
            expected = [w / sum(expected) for w in expected]
        assert weights[t].tolist() == pytest.approx(expected, rel=1e-5)


def test_forced_ids_take_scores_at_those_ids():
    spec = small_spec(renormalize=False, router_scoring="sigmoid")
    logits = torch.randn(4, 8)
    forced = torch.tensor([[7, 0], [1, 2], [3, 4], [5, 6]])
    ids, weights = route(logits, spec, forced_ids=forced)
    assert torch.equal(ids, forced)
    assert torch.equal(weights, logits.sigmoid().gather(1, forced))


def test_softmax_over_the_top_k_logits():
    """gpt-oss: top-k of the raw logits, softmax over those k only (equal to a renormalised softmax)."""
    spec = small_spec(router_scoring="softmax_topk", renormalize=False, top_k=3)
    logits = torch.randn(6, 8)
    ids, weights = route(logits, spec)
    for t, row in enumerate(logits.tolist()):
        best = _top(row, 3)
        assert ids[t].tolist() == best
        assert weights[t].tolist() == pytest.approx(_softmax([row[e] for e in best]), rel=1e-5)


def test_selection_bias_chooses_and_the_unbiased_scores_weigh():
    spec = small_spec(router_scoring="sigmoid", selection_bias=True, renormalize=True, top_k=2)
    logits = torch.randn(6, 8)
    bias = torch.tensor([2.0, 0, 0, 0, 0, 0, 0, -2.0])  # expert 0 always wins a slot, 7 never does
    ids, weights = route(logits, spec, bias)
    for t, row in enumerate(logits.tolist()):
        scores = _sigmoid(row)
        best = _top([s + b for s, b in zip(scores, bias.tolist(), strict=True)], 2)
        assert ids[t].tolist() == best and 0 in best and 7 not in best
        assert weights[t].tolist() == pytest.approx([scores[e] / sum(scores[j] for j in best) for e in best])


@pytest.mark.parametrize("method", ["group_max", "group_top2_sum"])
def test_group_limited_choice_keeps_the_best_groups(method):
    """DeepSeek-V2 ranks a group by its best score, DeepSeek-V3 by the sum of its two best; only
    experts of the topk_group best groups may be chosen."""
    spec = small_spec(
        num_experts=12, top_k=3, topk_method=method, n_group=4, topk_group=2, router_scoring="sigmoid",
        selection_bias=method == "group_top2_sum", renormalize=False, routed_scaling_factor=2.5,
    )  # fmt: skip
    logits = torch.randn(20, 12)
    bias = torch.randn(12) * 0.3 if spec.selection_bias else None
    ids, weights = route(logits, spec, bias)
    for t, row in enumerate(logits.tolist()):
        scores = _sigmoid(row)
        chosen = [s + (bias[e].item() if bias is not None else 0) for e, s in enumerate(scores)]
        groups = [chosen[g * 3 : g * 3 + 3] for g in range(4)]
        rank = [max(g) if method == "group_max" else sum(sorted(g)[-2:]) for g in groups]
        kept = _top(rank, 2)
        allowed = {g * 3 + i for g in kept for i in range(3)}
        best = _top(chosen, 3, allowed)
        assert ids[t].tolist() == best
        assert weights[t].tolist() == pytest.approx([2.5 * scores[e] for e in best], rel=1e-5)


def test_p_norm_then_scaling():
    """DBRX divides the top-k weights by their p-norm; the scaling factor comes after."""
    spec = small_spec(top_k=3, norm_p=2.0, routed_scaling_factor=3.0)
    logits = torch.randn(4, 8)
    _, weights = route(logits, spec)
    for t, row in enumerate(logits.tolist()):
        picked = [_softmax(row)[e] for e in _top(_softmax(row), 3)]
        norm = math.sqrt(sum(w * w for w in picked))
        assert weights[t].tolist() == pytest.approx([3.0 * w / norm for w in picked], rel=1e-5)


def _sparsemixer_reference(
    row: list[float], eps: float, forced: list[int] | None
) -> tuple[list[int], list[float]]:
    taken: list[int] = []
    weights = []
    for rank in range(2):
        free = [e for e in range(len(row)) if e not in taken]
        pick = forced[rank] if forced else max(free, key=lambda e: (row[e], -e))
        top = row[pick]
        near = [e for e in free if (top - row[e]) / max(abs(row[e]), top) <= 2 * eps]
        total = sum(math.exp(row[e] - top) for e in near)
        weights.append(1.0 / total if pick in near else 0.0)
        taken.append(pick)
    return taken, weights


@pytest.mark.parametrize("forced", [False, True])
def test_sparsemixer_weighs_each_pick_against_its_near_rivals(forced):
    """PhiMoE: each of the two picks is weighted by a softmax over the experts not yet taken whose
    logits lie within a relative 2·eps of its own; the weights are not normalised."""
    spec = small_spec(router_scoring="sparsemixer", sparsemixer_eps=0.05, renormalize=False)
    logits = torch.randn(30, 8).abs() + 1.0  # positive logits: the relative window is well defined
    logits[:10, 1] = logits[:10, 0] * 0.97  # some near ties, which share the weight
    ids_given = torch.stack([torch.randperm(8)[:2] for _ in range(30)]) if forced else None
    ids, weights = route(logits, spec, forced_ids=ids_given)
    for t, row in enumerate(logits.tolist()):
        want_ids, want = _sparsemixer_reference(row, 0.05, ids_given[t].tolist() if forced else None)
        assert ids[t].tolist() == want_ids
        assert weights[t].tolist() == pytest.approx(want, rel=1e-5)
    assert (weights < 0.999).any() and (weights > 0.999).any()  # both cases occurred


def test_router_bias_is_added_to_the_logits():
    spec = small_spec(router_bias=True)
    weights = random_weights(spec.with_dtype("float32"))
    x = torch.randn(3, 16)
    expected = x @ weights.router.T + weights.router_bias
    assert torch.allclose(router_logits(x, weights, spec), expected)


@pytest.mark.parametrize("text", ["uniform", "zipf:1.5", "dirichlet:0.2", "hot:3", "hot:8"])
@pytest.mark.parametrize("k", [1, 3, 8])
def test_synthetic_ids_are_valid_distinct_and_seeded(text, k):
    spec = small_spec(top_k=k)
    choice = parse_routing(text)
    if text.startswith("hot") and int(choice.param) < k:
        with pytest.raises(UserError):
            synthetic_ids(choice, 10, spec, seed=1)
        return
    ids = synthetic_ids(choice, 50, spec, seed=1)
    assert ids.shape == (50, k) and ids.dtype == torch.int64
    assert ids.min() >= 0 and ids.max() < 8
    assert all(len(set(row)) == k for row in ids.tolist())
    assert torch.equal(ids, synthetic_ids(choice, 50, spec, seed=1))
    if text.startswith("hot"):
        assert len(set(ids.flatten().tolist())) <= int(choice.param)


def test_zipf_concentrates_on_few_experts():
    spec = small_spec(num_experts=64, top_k=1)
    ids = synthetic_ids(parse_routing("zipf:2.0"), 4000, spec, seed=0)
    counts = np.bincount(ids.flatten().numpy(), minlength=64)
    assert counts.max() > 0.4 * counts.sum()  # p(top expert) = 1/zeta(2) ≈ 0.61


def test_trace_round_trip(tmp_path):
    spec = small_spec()
    path = tmp_path / "ids.npy"
    np.save(path, np.array([[0, 7], [3, 1]], dtype=np.int32))
    assert load_trace(path, spec).tolist() == [[0, 7], [3, 1]]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (np.array([[0, 8]]), "out of range"),
        (np.array([[0, -1]]), "out of range"),
        (np.array([[1, 1]]), "twice"),
        (np.array([0, 1]), r"expected a \[T, k\] array"),
        (np.zeros((0, 2), dtype=np.int64), r"expected a \[T, k\] array"),
        (np.array([[0.0, 1.0]]), "integers"),
        (np.array([[0, 1, 2]]), "k=3"),
    ],
)
def test_trace_rejects_bad_content(tmp_path, content, message):
    path = tmp_path / "bad.npy"
    np.save(path, content)
    with pytest.raises(UserError, match=message):
        load_trace(path, small_spec())


def test_trace_rejects_garbage_and_missing(tmp_path):
    garbage = tmp_path / "garbage.npy"
    garbage.write_bytes(b"not an array at all")
    with pytest.raises(UserError, match="not a readable"):
        load_trace(garbage, small_spec())
    with pytest.raises(UserError, match="no such file"):
        load_trace(tmp_path / "missing.npy", small_spec())


def _header_only(path, shape, rows_written):
    """An .npy file whose header claims ``shape`` while it holds ``rows_written`` rows."""
    with path.open("wb") as handle:
        np.lib.format.write_array_header_1_0(handle, {"descr": "<i8", "fortran_order": False, "shape": shape})
        handle.write(np.zeros((rows_written, shape[1]), dtype=np.int64).tobytes())
    return path


@pytest.mark.parametrize(
    ("shape", "rows", "message"),
    [((10**12, 2), 3, "beyond the limits"), ((100, 2), 10, "truncated"), ((4, 2, 2), 0, r"\[T, k\]")],
)
def test_trace_header_is_checked_before_any_data_is_read(tmp_path, shape, rows, message):
    """np.load would allocate what the header claims: 10**12 rows is 16 TB."""
    path = _header_only(tmp_path / "h.npy", shape, rows)
    with pytest.raises(UserError, match=message):
        load_trace(path, small_spec())


def test_trace_npz_is_named_as_such(tmp_path):
    np.savez(tmp_path / "t.npz", ids=np.zeros((2, 2), np.int64))
    with pytest.raises(UserError, match="npz archive"):
        load_trace(tmp_path / "t.npz", small_spec())


def test_hot_routing_beyond_the_experts_is_refused_up_front():
    with pytest.raises(UserError, match="hot:9"):
        check_routing(parse_routing("hot:9"), small_spec())
    check_routing(parse_routing("hot:2"), small_spec())
