"""The CLI end to end on tiny layers: JSON schema and identities, exact counts, and bad input → exit 2."""

from __future__ import annotations

import csv
import json
import random

import numpy as np
import pytest

from moecap_kernels._ext import load_extension
from moecap_kernels.profile import main
from tests.helpers import tiny_config

PEAKS = ["--peak-bandwidth", "50e9", "--peak-flops", "500e9"]
FAST = ["--warmup", "1", "--reps", "3", *PEAKS]


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def hand_counts(ids: list[list[int]], experts: int, hidden: int, inter: int, b: int) -> dict[str, int]:
    """What one forward must count, by a plain loop over the trace."""
    per_expert = [0] * experts
    for row in ids:
        for e in row:
            per_expert[e] += 1
    activated = sum(1 for n in per_expert if n)
    p_e = 3 * hidden * inter
    tokens = len(ids)
    return {
        "tokens_per_expert": per_expert,
        "activated_experts": activated,
        "routed_pairs": sum(per_expert),
        "compulsory": activated * p_e * b + experts * hidden * b + 2 * tokens * hidden * b,
        "useful": sum(n * 2 * p_e for n in per_expert) + 2 * tokens * hidden * experts,
    }


TRACES = {
    "one-token": [[3, 5]],
    "all-to-one": [[2, 6]] * 9,
    "every-expert": [[t % 8, (t + 3) % 8] for t in range(16)],
    "random": [random.Random(7).sample(range(8), 2) for _ in range(21)],
}


@pytest.mark.parametrize("trace", list(TRACES))
def test_json_counts_bytes_flops_and_identities(tmp_path, capsys, trace):
    ids = TRACES[trace]
    np.save(tmp_path / "ids.npy", np.array(ids, dtype=np.int64))
    out_json, out_csv = tmp_path / "out.json", tmp_path / "out.csv"
    code, _, err = run_cli(
        capsys, "--config", str(tiny_config(tmp_path / "m")), "--routing", f"trace:{tmp_path / 'ids.npy'}",
        "--backend", "loop,grouped", "--json", str(out_json), "--csv", str(out_csv), *FAST,
    )  # fmt: skip
    assert code == 0, err
    results = json.loads(out_json.read_text())["results"]
    assert [r["backend"] for r in results] == ["loop", "grouped"]
    expected = hand_counts(ids, experts=8, hidden=64, inter=48, b=4)
    for r in results:
        assert r["tokens"] == len(ids) and r["dtype"] == "float32" and r["phase"] == "decode"
        for key in ("tokens_per_expert", "activated_experts", "routed_pairs"):
            assert r["counts"][key] == expected[key]
        assert r["bytes"]["compulsory"] == expected["compulsory"]
        assert r["flops"]["useful"] == expected["useful"]
        assert (
            r["s_mbu"]
            == r["bytes"]["compulsory"] / r["time_s"]["median"] / r["peak"]["bandwidth_bytes_per_s"]
        )
        assert r["s_mfu"] == r["flops"]["useful"] / r["time_s"]["median"] / r["peak"]["flops_per_s"]
        assert r["peak"]["bandwidth_bytes_per_s"] == 50e9 and "user" in r["peak"]["source"]
        assert r["time_s"]["p10"] <= r["time_s"]["median"] <= r["time_s"]["p90"]
        assert r["accuracy"]["rel_error"] < 1e-5
    rows = list(csv.DictReader(out_csv.open()))
    assert [row["backend"] for row in rows] == ["loop", "grouped"]
    assert int(rows[0]["bytes.compulsory"]) == expected["compulsory"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "ids.npy",
        "m",
        "out.csv",
        "out.json",
    ]  # no temp files


def test_router_sweep_table_and_bf16_accuracy(tmp_path, capsys):
    out_json = tmp_path / "out.json"
    code, out, err = run_cli(
        capsys, "--config", str(tiny_config(tmp_path / "m", experts=16, top_k=4)), "--dtype", "bfloat16",
        "--batch", "1,5", "--routing", "zipf:1.2", "--json", str(out_json), *FAST,
    )  # fmt: skip
    assert code == 0, err
    results = json.loads(out_json.read_text())["results"]
    assert {(r["tokens"], r["backend"]) for r in results} >= {(1, "loop"), (5, "grouped")}
    assert all(r["accuracy"]["rel_error"] < 1e-2 for r in results)
    assert all(r["counts"]["routed_pairs"] == 4 * r["tokens"] for r in results)
    assert "S-MBU" in out and "user: --peak-bandwidth" in out


def test_prefill_tokens_are_batch_times_seq_len(tmp_path, capsys):
    out_json = tmp_path / "out.json"
    code, _, err = run_cli(
        capsys, "--config", str(tiny_config(tmp_path / "m")), "--phase", "prefill", "--batch", "2",
        "--seq-len", "6", "--backend", "grouped", "--json", str(out_json), *FAST,
    )  # fmt: skip
    assert code == 0, err
    (r,) = json.loads(out_json.read_text())["results"]
    assert (r["tokens"], r["seq_len"], r["phase"]) == (12, 6, "prefill")


def test_list_models(capsys):
    code, out, _ = run_cli(capsys, "--list-models")
    assert code == 0
    assert "mixtral-8x7b" in out and "deepseek-v3" in out


def test_list_devices(capsys):
    code, out, _ = run_cli(capsys, "--list-devices")
    assert code == 0
    assert "H200" in out and "A100" in out and "MI300X" in out


def test_triton_refused_without_gpu_or_interpreter(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    code, _, err = run_cli(capsys, "--config", str(tiny_config(tmp_path / "m")), "--backend", "triton", *FAST)
    assert code == 2 and "TRITON_INTERPRET=1" in err


def test_triton_kernel_counters_in_json(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    out_json = tmp_path / "out.json"
    code, out, err = run_cli(
        capsys, "--config", str(tiny_config(tmp_path / "m", hidden=32, inter=32)), "--dtype", "float16",
        "--backend", "triton", "--batch", "5", "--json", str(out_json), *FAST,
    )  # fmt: skip
    assert code == 0, err
    (r,) = json.loads(out_json.read_text())["results"]
    kernel, per_expert = r["kernel"], r["counts"]["tokens_per_expert"]
    block = kernel["block_m"]
    padded = sum(-(-n // block) * block for n in per_expert)
    assert kernel["padded_rows"] == padded - r["counts"]["routed_pairs"]
    p_e_bytes = 3 * 32 * 32 * 2
    assert kernel["issued_weight_bytes"] == sum(-(-n // block) for n in per_expert) * p_e_bytes
    assert kernel["padding_waste"] == kernel["executed_flops"] / r["flops"]["experts"]
    assert r["accuracy"]["rel_error"] < 1e-2
    assert "pad. waste" in out


# --- --dry-run ---------------------------------------------------------------------------------


def test_dry_run_shows_every_field_with_its_origin_and_allocates_nothing(tmp_path, capsys, monkeypatch):
    import moecap_kernels.runner as runner

    def refuse(*args, **kwargs):
        raise AssertionError("a dry run allocated the layer")

    monkeypatch.setattr(runner, "random_weights", refuse)
    config = tiny_config(tmp_path / "m", experts=16, top_k=4, norm_topk_prob=True)
    code, out, err = run_cli(
        capsys,
        "--config",
        str(config),
        "--dry-run",
        "--batch",
        "1,4",
        "--json",
        str(tmp_path / "o.json"),
        *PEAKS,
    )
    assert code == 0, err
    for field, origin in [
        ("hidden_size", "hidden_size"),
        ("num_experts", "num_local_experts"),
        ("top_k", "num_experts_per_tok"),
        ("renormalize", "renormalised over the top-k (Mixtral)"),
        ("weight_dtype", "torch_dtype"),
        ("activation", "hidden_act (absent: silu)"),
        ("gated", "default"),
    ]:
        line = next(line for line in out.splitlines() if f" {field} " in line)
        assert origin in line, line
    assert "T = 1, 4" in out and "user: --peak-bandwidth" in out
    assert out.count("memory at T =") == 2 and ": fits" in out
    assert "would write" in out and not (tmp_path / "o.json").exists()


def test_dry_run_says_what_would_be_measured_and_what_would_not_fit(tmp_path, capsys, monkeypatch):
    load_extension()  # built in the real cache: the empty one below is for calibrations
    monkeypatch.setenv("MOECAP_CACHE_DIR", str(tmp_path / "empty-cache"))
    code, out, err = run_cli(
        capsys, "--model", "deepseek-v3", "--dtype", "float32", "--device", "cpu", "--dry-run"
    )
    assert code == 0, err
    assert "measured at the start of the run (none cached yet)" in out
    assert "would be refused" in out and "--dtype" in out
    assert not (tmp_path / "empty-cache").exists() or not list(
        (tmp_path / "empty-cache").glob("calibration-*")
    )


def test_outputs_are_written_together(tmp_path, capsys):
    out_json, out_csv = tmp_path / "o.json", tmp_path / "o.csv"
    config = tiny_config(tmp_path / "m")
    code, _, err = run_cli(
        capsys, "--config", str(config), "--json", str(out_json), "--csv", str(out_csv), *FAST
    )
    assert code == 0, err
    assert json.loads(out_json.read_text())["results"] and out_csv.read_text().startswith("model,")


@pytest.mark.parametrize("share", [0.01, 0.6])
def test_calibrated_peaks_carry_their_spread_and_an_unstable_one_says_so(
    tmp_path, capsys, monkeypatch, share
):
    from dataclasses import replace

    from moecap_kernels import hardware
    from moecap_kernels.hardware import calibration
    from tests.hardware_fakes import fake_calibration

    load_extension()
    monkeypatch.setenv("MOECAP_CACHE_DIR", str(tmp_path / "cache"))
    info = hardware.detect_device("cpu")
    fake = replace(fake_calibration(others_cpu_share=share), machine_id=info.machine_id, kind="cpu")
    fake = replace(fake, read_bandwidth_bytes_per_s=40e9, gemm_flops_per_s={"float32": 2e11})
    monkeypatch.setattr(calibration, "_measure", lambda *args: fake)
    out_json = tmp_path / "o.json"
    config = tiny_config(tmp_path / "m")
    code, out, err = run_cli(
        capsys, "--config", str(config), "--json", str(out_json), "--warmup", "0", "--reps", "2"
    )
    assert code == 0, err
    peak = json.loads(out_json.read_text())["results"][0]["peak"]
    assert peak["bandwidth_bytes_per_s"] == 40e9 and peak["bandwidth_spread"] == 0.02
    assert peak["flops_spread"] == 0.0 and "trials within 2.0%" in out
    cached = list((tmp_path / "cache").glob("calibration-*.json"))
    if share < calibration.BUSY_LIMIT:
        assert peak["caveat"] is None and len(cached) == 1
    else:
        assert "other processes took 60%" in peak["caveat"] and not cached
        assert "calibration unstable" in out and "not cached" in out
