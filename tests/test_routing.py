"""Routing: router top-k arithmetic, synthetic distributions, trace validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moecap_kernels.errors import UserError
from moecap_kernels.routing import check_routing, load_trace, parse_routing, route, synthetic_ids
from moecap_kernels.spec import MoESpec


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


@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_route_matches_plain_computation(scoring, renormalize):
    spec = small_spec(router_scoring=scoring, renormalize=renormalize, top_k=3)
    logits = torch.randn(5, 8, dtype=torch.float64)
    scores = logits.softmax(-1) if scoring == "softmax" else logits.sigmoid()
    ids, weights = route(scores, spec)
    for t in range(5):
        row = scores[t].tolist()
        best = sorted(range(8), key=lambda e: -row[e])[:3]
        assert ids[t].tolist() == best
        expected = [row[e] for e in best]
        if renormalize:
            expected = [w / sum(expected) for w in expected]
        assert weights[t].tolist() == pytest.approx(expected)


def test_forced_ids_take_scores_at_those_ids():
    spec = small_spec(renormalize=False)
    scores = torch.rand(4, 8)
    forced = torch.tensor([[7, 0], [1, 2], [3, 4], [5, 6]])
    ids, weights = route(scores, spec, forced)
    assert torch.equal(ids, forced)
    assert torch.equal(weights, scores.gather(1, forced))


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
