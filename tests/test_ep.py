"""Expert parallelism: placement, the exact traffic matrix against a plain-Python count, and real
two-rank runs on gloo (counts, traffic, output, failure) through the CLI."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from moecap_kernels.counters import CountAccumulator
from moecap_kernels.ep.placement import Placement, contiguous, load_placement
from moecap_kernels.ep.project import Link, link_times
from moecap_kernels.ep.run import global_counts
from moecap_kernels.ep.traffic import balancedness, traffic_matrix
from moecap_kernels.errors import UserError
from moecap_kernels.profile import main
from tests.helpers import tiny_config, tiny_spec

PEAKS = ["--peak-bandwidth", "50e9", "--peak-flops", "500e9"]
FAST = ["--warmup", "1", "--reps", "3", *PEAKS]


def hand_destination(expert_ranks: list[list[int]], source: int, expert: int) -> int:
    """The rule of the placement module, restated: the source's own copy, else copy s mod n."""
    copies = expert_ranks[expert]
    return source if source in copies else copies[source % len(copies)]


def hand_traffic(ids_by_source: list[list[list[int]]], expert_ranks: list[list[int]], ranks: int):
    matrix = [[0] * ranks for _ in range(ranks)]
    for source, rows in enumerate(ids_by_source):
        for row in rows:
            for e in row:
                matrix[source][hand_destination(expert_ranks, source, e)] += 1
    return matrix


def test_contiguous_placement_splits_experts_in_order():
    p = contiguous(8, 3)
    assert p.experts_of_rank == ((0, 1, 2), (3, 4, 5), (6, 7))
    assert [p.destination(0, e) for e in (0, 4, 7)] == [(0, 0), (1, 1), (2, 1)]
    with pytest.raises(UserError, match="more ranks"):
        contiguous(4, 5)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ('{"expert_ranks": [[0], [1], [0]]}', "3 lists for 4 experts"),
        ('{"expert_ranks": [[0], [1], [], [0]]}', "expert 2 is on no rank"),
        ('{"expert_ranks": [[0], [1], [2], [0]]}', r"rank 2, out of range \[0, 2\)"),
        ('{"expert_ranks": [[0], [1], [1, 1], [0]]}', "twice"),
        ('{"expert_ranks": [[0], [0], [0], [0]]}', "rank 1 holds no expert"),
        ('{"ranks": 2}', "expected"),
        ("not json", "not a readable JSON"),
    ],
)
def test_bad_placement_files_are_refused(tmp_path, text, match):
    path = tmp_path / "p.json"
    path.write_text(text)
    with pytest.raises(UserError, match=match):
        load_placement(path, 4, 2)


ROUTINGS = {
    "one-token": lambda rng, e, k, t: [rng.sample(range(e), k)],
    "all-to-one": lambda rng, e, k, t: [
        [3, *rng.sample([x for x in range(e) if x != 3], k - 1)] for _ in range(t)
    ],
    "every-expert": lambda rng, e, k, t: [[(i * k + j) % e for j in range(k)] for i in range(t)],
    "k-equals-E": lambda rng, e, k, t: [rng.sample(range(e), e) for _ in range(t)],
    "random": lambda rng, e, k, t: [rng.sample(range(e), k) for _ in range(t)],
}


@pytest.mark.parametrize("routing", list(ROUTINGS))
@pytest.mark.parametrize("replicated", [False, True])
def test_traffic_matrix_equals_a_plain_count(routing, replicated):
    rng = random.Random(hash((routing, replicated)) % 1000)
    experts, ranks = 8, 3
    k = experts if routing == "k-equals-E" else 2
    expert_ranks = [[e * ranks // experts] for e in range(experts)]
    if replicated:  # hot experts copied, as EPLB does
        expert_ranks[3] = [1, 0]
        expert_ranks[6] = [2, 0, 1]
    by_source = [ROUTINGS[routing](rng, experts, k, rng.randint(1, 9)) for _ in range(ranks)]
    placement = Placement(ranks, tuple(tuple(c) for c in expert_ranks))
    got = traffic_matrix([torch.tensor(s) for s in by_source], placement)
    assert got == hand_traffic(by_source, expert_ranks, ranks)
    assert sum(map(sum, got)) == sum(len(s) * k for s in by_source)


def test_global_counts_are_the_single_process_counts():
    spec = tiny_spec()
    rng = random.Random(3)
    parts = [torch.tensor([rng.sample(range(8), 2) for _ in range(n)]) for n in (5, 1, 7)]
    per_rank = []
    for ids in parts:
        acc = CountAccumulator(spec, "cpu")
        acc.add(ids)
        per_rank.append(acc.read())
    single = CountAccumulator(spec, "cpu")
    single.add(torch.cat(parts))
    assert global_counts(spec, per_rank) == single.read()


def test_balancedness_is_mean_over_max():
    assert balancedness([4, 4]) == 1.0
    assert balancedness([6, 2]) == pytest.approx(4 / 6)
    assert balancedness([0, 0]) == 0.0


def test_bad_ep_input_is_one_line_before_any_rank_starts(tmp_path, capsys):
    config = tiny_config(tmp_path / "m")
    (tmp_path / "p.json").write_text('{"expert_ranks": [[0], [1], [5], [0], [1], [0], [1], [0]]}')
    np.save(tmp_path / "ids.npy", np.array([[0, 1]] * 5))
    cases = [
        (["--ep", "2", "--placement", str(tmp_path / "p.json")], "out of range"),
        (["--ep", "2", "--placement", str(tmp_path / "missing.json")], "no such file"),
        (["--placement", str(tmp_path / "p.json")], "give --ep or --project-ep too"),
        (["--ep", "9"], "more ranks than the layer's 8 experts"),
        (["--ep", "2", "--routing", f"trace:{tmp_path / 'ids.npy'}"], "do not split evenly"),
    ]
    for extra, match in cases:
        assert main(["--config", str(config), *extra, *FAST]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and match in err, err


def _run(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "moecap_kernels.profile", *args],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, **(env or {})},
    )


def test_two_ranks_on_a_trace_count_route_and_compute_as_one_process(tmp_path):
    rng = random.Random(11)
    ids = [rng.sample(range(8), 2) for _ in range(14)] + [[2, 6]] * 4  # T = 9 per rank
    np.save(tmp_path / "ids.npy", np.array(ids, dtype=np.int64))
    out = tmp_path / "out.json"
    done = _run(
        ["--config", str(tiny_config(tmp_path / "m")), "--ep", "2",
         "--routing", f"trace:{tmp_path / 'ids.npy'}", "--backend", "loop,grouped", "--json", str(out), *FAST]
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    per_expert = [0] * 8
    for row in ids:
        for e in row:
            per_expert[e] += 1
    expected = hand_traffic([ids[:9], ids[9:]], [[e // 4] for e in range(8)], 2)
    rows = json.loads(out.read_text())["results"]
    assert [r["backend"] for r in rows] == ["loop ep2", "grouped ep2"]
    for r in rows:
        ep = r["ep"]
        assert r["tokens"] == 18 and ep["tokens_per_rank"] == 9
        assert r["counts"]["tokens_per_expert"] == per_expert
        assert r["counts"]["activated_experts"] == sum(1 for n in per_expert if n)
        assert ep["traffic_pairs"] == expected
        assert ep["received_pairs"] == [sum(col) for col in zip(*expected, strict=True)]
        assert ep["dispatch_bytes"] == [[n * 64 * 4 for n in row] for row in expected]
        assert ep["combine_bytes"] == ep["dispatch_bytes"]
        hit = [sum(1 for e in range(4 * rank, 4 * rank + 4) if per_expert[e]) for rank in range(2)]
        assert ep["activated_experts"] == hit
        assert r["bytes"]["expert_weights"] == sum(hit) * 3 * 64 * 48 * 4
        assert r["accuracy"]["rel_error"] < 1e-5
        assert ep["rel_error_vs_single_process"] < 1e-5
        assert set(ep["time_s"]) == {"router", "dispatch", "experts", "combine"}
        ranks = ep["per_rank"]  # two ranks on one CPU: the machine's peak, their mean experts time
        mean_experts = sum(r["time_s"]["experts"] for r in ranks) / 2
        assert ep["devices_shared"] and r["peak"]["bandwidth_bytes_per_s"] == 50e9
        assert ep["s_mbu_experts"] == pytest.approx(
            sum(r["expert_bytes"] for r in ranks) / mean_experts / 50e9
        )
        assert ranks[0]["expert_bytes"] == hit[0] * 3 * 64 * 48 * 4
        assert 0 < ep["comm_share"] < 1


def test_replicated_placement_with_shared_experts_and_gate(tmp_path):
    """Qwen2-MoE layout (gated shared expert) on a placement with a hot expert copied on both ranks."""
    config = tiny_config(
        tmp_path / "m", model_type="qwen2_moe", num_experts=8, moe_intermediate_size=48,
        shared_expert_intermediate_size=32, norm_topk_prob=False,
    )  # fmt: skip
    placement = tmp_path / "p.json"
    placement.write_text(json.dumps({"expert_ranks": [[0], [0], [0, 1], [0], [1], [1], [1], [1]]}))
    out = tmp_path / "out.json"
    done = _run(
        ["--config", str(config), "--ep", "2", "--placement", str(placement), "--routing", "hot:3",
         "--batch", "5", "--backend", "grouped", "--json", str(out), *FAST]
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    (r,) = json.loads(out.read_text())["results"]
    ep = r["ep"]
    assert ep["placement"]["experts_of_rank"] == [[0, 1, 2, 3], [2, 4, 5, 6, 7]]
    assert ep["placement"]["redundant_copies"] == 1
    assert r["spec"]["num_shared_experts"] == 1 and r["spec"]["shared_expert_gate"]
    assert r["accuracy"]["rel_error"] < 1e-5 and ep["rel_error_vs_single_process"] < 1e-5
    assert sum(ep["received_pairs"]) == r["counts"]["routed_pairs"] == 10 * 2


def test_a_rank_that_dies_ends_every_rank_with_one_line_and_exit_2(tmp_path):
    done = _run(
        [
            "--config",
            str(tiny_config(tmp_path / "m")),
            "--ep",
            "2",
            "--batch",
            "3",
            "--backend",
            "loop",
            *FAST,
        ],
        env={"MOECAP_EP_TEST_KILL_RANK": "1"},
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert "rank 1 died (signal SIGKILL)" in lines[-1]
    assert all(line.startswith("moecap: error: ") for line in lines) and len(lines) <= 2, done.stderr


def test_ctrl_c_stops_every_rank_with_one_line_and_130(tmp_path):
    args = ["--config", str(tiny_config(tmp_path / "m")), "--ep", "2", "--batch", "2", "--backend", "loop"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "moecap_kernels.profile", *args, "--reps", "10000", *PEAKS],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # a terminal's Ctrl-C reaches the whole process group
    )
    time.sleep(8)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert err.strip().splitlines() == ["moecap: interrupted"], err


def test_link_times_follow_the_stated_formula():
    spec = tiny_spec(hidden_size=64, weight_dtype="float32", act_dtype="float32")
    link = Link("x", "x", 1e9, 1e-6, "test", "test")
    dispatch, combine = link_times([[2, 3], [0, 5]], spec, link)
    row = 64 * 4  # rank 0 sends 3 rows off-rank, rank 1 receives them; one peer each
    assert dispatch == pytest.approx([2e-6 + 3 * row / 1e9] * 2)
    assert combine == pytest.approx([1e-6 + 3 * row / 1e9] * 2)
    alone = link_times([[4, 0], [0, 4]], spec, link)  # nothing crosses the link
    assert alone == ([0.0, 0.0], [0.0, 0.0])


def test_projection_counts_exact_traffic_for_many_ranks(tmp_path):
    rng = random.Random(5)
    ids = [rng.sample(range(16), 2) for _ in range(32)]
    np.save(tmp_path / "ids.npy", np.array(ids, dtype=np.int64))
    out = tmp_path / "p.json"
    config = tiny_config(tmp_path / "m", experts=16)
    code = main(
        ["--config", str(config), "--project-ep", "4,16", "--link", "nvlink4,ib-ndr", "--backend", "grouped",
         "--routing", f"trace:{tmp_path / 'ids.npy'}", "--json", str(out), *FAST]
    )  # fmt: skip
    assert code == 0
    records = json.loads(out.read_text())["ep_projection"]
    assert [(r["ranks"], r["link"]["key"]) for r in records] == [
        (4, "nvlink4"), (4, "ib-ndr"), (16, "nvlink4"), (16, "ib-ndr"),
    ]  # fmt: skip
    spec = tiny_spec(hidden_size=64, num_experts=16, weight_dtype="float32", act_dtype="float32")
    for r in records:
        n = r["ranks"]
        per = 32 // n
        by_source = [ids[s * per : (s + 1) * per] for s in range(n)]
        expected = hand_traffic(by_source, [[e * n // 16] for e in range(16)], n)
        assert r["projected"] is True and r["tokens_per_rank"] == per
        assert r["traffic_pairs"] == expected
        link = Link("l", "l", r["link"]["bytes_per_s"], r["link"]["latency_s"], "", "")
        assert r["dispatch_s"] == pytest.approx(link_times(expected, spec, link)[0])
        assert r["expert_time_s"]["median"] > 0 and r["expert_time_s"]["backend"] == "grouped"


def test_bad_projection_input_is_one_line(tmp_path, capsys):
    config = str(tiny_config(tmp_path / "m"))
    cases = [
        (["--project-ep", "2", "--link", "warp9"], "unknown link 'warp9'"),
        (["--project-ep", "2"], "needs --link"),
        (["--link", "nvlink4"], "apply to --project-ep only"),
        (["--project-ep", "2", "--ep", "2", "--link", "nvlink4"], "not both"),
        (["--project-ep", "2", "--link", "nvlink4", "--link-latency", "5"], "seconds from 0 to 1"),
    ]
    for extra, match in cases:
        assert main(["--config", config, *extra, *FAST]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and match in err, err


def test_dry_run_names_the_placement_and_starts_no_rank(tmp_path, capsys):
    placement = tmp_path / "p.json"
    placement.write_text(json.dumps({"expert_ranks": [[0], [0], [1, 0], [0], [1], [2], [2], [2]]}))
    code = main(["--config", str(tiny_config(tmp_path / "m")), "--ep", "3", "--placement", str(placement),
                 "--dry-run", *PEAKS])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    assert f"expert parallel: 3 ranks, 2–4 experts per rank ({placement}, 1 redundant copy)" in out
