"""Routing over time and offloaded experts: cache counts against plain-Python simulations, trace
statistics, synthetic sequences, the recorder on a tiny checkpoint, the offloaded run through the CLI."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest

from moecap_kernels.errors import UserError
from moecap_kernels.offload.cache import CacheCounts, simulate, step_experts
from moecap_kernels.offload.run import chunks
from moecap_kernels.offload.sequence import check_sequence, load_layers, synthetic_sequence
from moecap_kernels.offload.stats import reuse_distances, sequence_stats
from moecap_kernels.profile import main as profile_main
from moecap_kernels.record import main as record_main
from tests.helpers import tiny_config, tiny_spec

PEAKS = ["--peak-bandwidth", "50e9", "--peak-flops", "500e9"]


def plain_cache(steps: list[list[int]], capacity: int, policy: str) -> tuple[int, int, int]:
    """(hits, misses, evictions) by linear scans, restating the rules of ``offload.cache``."""
    flat = [e for step in steps for e in step]
    cached: list[int] = []
    last: dict[int, int] = {}
    freq: dict[int, int] = {}
    hits = misses = evictions = 0
    for i, e in enumerate(flat):
        freq[e] = freq.get(e, 0) + 1
        if e in cached:
            hits += 1
        else:
            misses += 1
            if capacity > 0:
                if len(cached) == capacity:
                    if policy == "lru":
                        victim = min(cached, key=lambda c: last[c])
                    elif policy == "lfu":
                        victim = min(cached, key=lambda c: (freq[c], last[c]))
                    else:
                        upcoming = {c: next((j for j in range(i + 1, len(flat)) if flat[j] == c), math.inf)
                                    for c in cached}  # fmt: skip
                        victim = max(cached, key=lambda c: (upcoming[c], -c))
                    cached.remove(victim)
                    evictions += 1
                cached.append(e)
        last[e] = i
    return hits, misses, evictions


def random_steps(rng: random.Random, experts: int, steps: int, per_step: int) -> list[list[int]]:
    return [sorted(rng.sample(range(experts), rng.randint(1, per_step))) for _ in range(steps)]


@pytest.mark.parametrize("policy", ["lru", "lfu", "belady"])
@pytest.mark.parametrize("seed", range(6))
def test_cache_counts_equal_a_plain_simulation(policy, seed):
    rng = random.Random(seed)
    experts = rng.choice([4, 8, 16])
    steps = random_steps(rng, experts, rng.randint(1, 40), min(experts, 6))
    working_set = len({e for s in steps for e in s})
    for capacity in sorted({0, 1, experts // 2, experts, working_set, working_set + 3}):
        got = CacheCounts.of(simulate(steps, capacity, policy))
        assert (sum(got.hits), sum(got.misses), sum(got.evictions)) == plain_cache(steps, capacity, policy)
        if capacity == 0:
            assert sum(got.hits) == 0 and sum(got.evictions) == 0
        if capacity >= working_set:  # only first accesses miss, nothing is evicted
            assert sum(got.misses) == working_set and sum(got.evictions) == 0


def test_belady_is_never_beaten_and_lru_hits_are_reuse_distances_below_c():
    rng = random.Random(3)
    steps = random_steps(rng, 12, 60, 5)
    distances = reuse_distances(steps)
    for capacity in range(13):
        rates = {p: CacheCounts.of(simulate(steps, capacity, p)).hit_rate for p in ("lru", "lfu", "belady")}
        assert rates["belady"] >= max(rates["lru"], rates["lfu"])
        lru_hits = sum(CacheCounts.of(simulate(steps, capacity, "lru")).hits)
        assert lru_hits == sum(1 for d in distances if d is not None and d < capacity)


def test_chunks_never_evict_their_own_experts():
    rng = random.Random(1)
    steps = random_steps(rng, 8, 30, 6)
    for capacity in (0, 1, 2, 3, 8):
        for step in simulate(steps, capacity, "lru"):
            parts = chunks(step, capacity)
            assert [a for p in parts for a in p] == step
            for p in parts:
                assert len(p) <= max(capacity, 1)
                for i, a in enumerate(p):  # what it evicts was not read earlier in its chunk
                    assert a.evicted not in {b.expert for b in p[:i]}


def test_trace_statistics_by_hand():
    ids = np.array([[[0, 1], [1, 2]], [[0, 1], [0, 1]], [[3, 0], [0, 1]]])  # 3 steps, T = 2, k = 2
    s = sequence_stats(ids, 4)
    assert s["distinct_per_step"] == {"min": 2, "mean": pytest.approx(8 / 3), "max": 3}
    assert s["working_set"]["1"] == pytest.approx(8 / 3) and "4" not in s["working_set"]
    assert s["pairs_per_expert"] == [5, 5, 1, 1]
    assert s["experts_for_90pct"] == 3  # 5 + 5 = 10 < 10.8 of 12 pairs
    p = np.array([5, 5, 1, 1]) / 12
    assert s["entropy_bits"] == pytest.approx(float(-(p * np.log2(p)).sum()))
    # accesses: 0 1 2 | 0 1 | 0 1 3 → distances None None None 2 2 1 1 None
    assert reuse_distances(step_experts(ids)) == [None, None, None, 2, 2, 1, 1, None]
    assert s["reuse_distance"]["histogram"] == {"first": 4, "2-3": 2, "1": 2}


def test_synthetic_sequences_are_valid_seeded_and_sticky():
    spec = tiny_spec(num_experts=8, top_k=2)
    for kind, param in (("uniform", None), ("zipf", 1.2), ("dirichlet", 0.3), ("sticky", 0.5)):
        a = synthetic_sequence(kind, param, 20, 5, spec, seed=4)
        assert a.shape == (20, 5, 2)
        check_sequence(a, spec, "test")  # k distinct valid experts per row
        assert (a == synthetic_sequence(kind, param, 20, 5, spec, seed=4)).all()
    frozen = synthetic_sequence("sticky", 1.0, 10, 3, spec, seed=0)
    assert (frozen == frozen[0]).all()
    fresh = synthetic_sequence("sticky", 0.0, 200, 4, spec, seed=0)
    kept = (fresh[1:] == fresh[:-1]).mean()
    assert kept < 0.3  # a redraw keeps the previous expert only by chance (about 1/7 here)


def test_bad_sequences_are_refused(tmp_path):
    spec = tiny_spec(num_experts=8, top_k=2)
    cases = {
        "flat.npy": (np.zeros((4, 2), dtype=np.int64), "expected a \\[steps, T, k\\]"),
        "range.npy": (np.full((2, 2, 2), 9, dtype=np.int64), "out of range"),
        "twice.npy": (np.array([[[1, 1]]]), "same expert twice"),
        "k.npy": (np.zeros((2, 2, 3), dtype=np.int64), "k=3"),
    }
    for name, (array, match) in cases.items():
        np.save(tmp_path / name, array)
        with pytest.raises(UserError, match=match):
            load_layers(tmp_path / name, spec)
    np.savez(tmp_path / "none.npz", other=np.zeros(3))
    with pytest.raises(UserError, match="no layer_"):
        load_layers(tmp_path / "none.npz", spec)


def _offload_json(tmp_path, *extra: str) -> dict:
    out = tmp_path / "off.json"
    code = profile_main(
        ["--offload", "disk", "--offload-dir", str(tmp_path), "--backend", "grouped", "--json", str(out),
         *PEAKS, *extra]
    )  # fmt: skip
    assert code == 0
    return json.loads(out.read_text())


def test_offloaded_run_counts_fetches_and_computes_the_layer(tmp_path):
    config = tiny_config(tmp_path / "m")  # H 64, F 48, E 8, k 2, float32
    doc = _offload_json(
        tmp_path, "--config", str(config), "--routing", "sticky:0.7", "--steps", "12", "--batch", "3",
        "--cache-experts", "0,2,8", "--trace-stats",
    )  # fmt: skip
    ids = synthetic_sequence("sticky", 0.7, 12, 3, tiny_spec(hidden_size=64, intermediate_size=48), seed=0)
    steps = step_experts(ids)
    assert doc["trace_stats"]["0"]["pairs_per_expert"] == np.bincount(ids.ravel(), minlength=8).tolist()
    assert len(doc["offload"]) == 9
    for r in doc["offload"]:
        hits, misses, evictions = plain_cache(steps, r["cache_experts"], r["policy"])
        assert (r["hits"], r["misses"], r["evictions"]) == (hits, misses, evictions)
        assert r["expert_bytes"] == 3 * 64 * 48 * 4
        assert r["fetched_bytes"] == misses * r["expert_bytes"]
        assert r["oracle_hit_rate"] == pytest.approx(
            plain_cache(steps, r["cache_experts"], "belady")[0] / (hits + misses)
        )
        assert r["max_rel_error_vs_resident"] < 1e-6
        assert [s["misses"] for s in r["per_step"]] and sum(s["misses"] for s in r["per_step"]) == misses
        assert r["tier"].startswith("disk (page cache dropped")
    assert not list(tmp_path.glob("moecap-experts-*"))  # the experts file is removed


def test_recorded_routing_replays_to_the_counts_it_recorded(tmp_path):
    from tests.transformers_models import FAMILIES, redraw

    for family in ("mixtral", "qwen3_moe"):
        model = FAMILIES[family].build()
        redraw(model, 0)
        folder = tmp_path / family
        model.save_pretrained(folder)
        (tmp_path / "prompts.txt").write_text("1 5 7 9\n3 2 8\n11 4\n")
        trace = tmp_path / f"{family}.npz"
        assert record_main(["--weights", str(folder), "--prompts", str(tmp_path / "prompts.txt"),
                            "--out", str(trace), "--steps", "5"]) == 0  # fmt: skip
        with np.load(trace) as data:
            layers = sorted(int(k[6:]) for k in data.files if k.startswith("layer_"))
            assert layers == [0, 1]
            recorded = {i: data[f"counts_layer_{i}"].tolist() for i in layers}
            assert data["layer_0"].shape[:2] == (5, 3)
            assert data["prefill_layer_0"].shape[0] == 4 + 3 + 2  # padding left out
        doc = _offload_json(
            tmp_path, "--weights", str(folder), "--routing", f"trace:{trace}", "--trace-stats",
            "--cache-experts", "1,2", "--policy", "lru,belady",
        )  # fmt: skip
        for i in layers:
            assert doc["trace_stats"][str(i)]["pairs_per_expert"] == recorded[i]
        with np.load(trace) as data:
            steps = step_experts(data["layer_0"])
        for r in doc["offload"]:
            assert (r["hits"], r["misses"]) == plain_cache(steps, r["cache_experts"], r["policy"])[:2]


def test_bad_offload_input_is_one_line(tmp_path, capsys):
    config = str(tiny_config(tmp_path / "m"))
    cases = [
        (["--offload", "disk", "--cache-experts", "9"], "the layer has 8 experts"),
        (["--offload", "disk", "--policy", "fifo"], "unknown cache policy 'fifo'"),
        (["--steps", "4"], "apply to --offload or --trace-stats only"),
        (["--offload", "disk", "--routing", "sticky:2"], "probability from 0 to 1"),
        (["--offload", "disk", "--routing", "hot:2"], "is no sequence"),
        (["--offload", "disk", "--batch", "1,2"], "one --batch"),
        (["--offload", "disk", "--quant", "int8"], "not offloaded yet"),
        (["--offload", "disk", "--offload-dir", str(tmp_path / "nowhere")], "not a folder"),
    ]
    for extra, match in cases:
        assert profile_main(["--config", config, *extra, *PEAKS]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and match in err, err
    assert record_main(["--weights", str(tmp_path / "none"), "--prompts", "x", "--out", "y"]) == 2
    assert "not a folder" in capsys.readouterr().err


def test_dry_run_describes_the_offload_and_writes_nothing(tmp_path, capsys):
    code = profile_main(
        ["--config", str(tiny_config(tmp_path / "m")), "--routing", "zipf:1.1", "--steps", "9",
         "--batch", "2", "--offload", "disk", "--offload-dir", str(tmp_path), "--cache-experts", "3",
         "--dry-run", *PEAKS]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    assert "zipf:1.1, 9 steps of T = 2; offload to disk: C = 3 of 8 experts" in out
    assert f"{3 * 64 * 48 * 4:,} B per expert" in out
    assert not list(tmp_path.glob("moecap-experts-*"))
