"""The CLI end to end on tiny layers: JSON schema and identities, exact counts, and bad input → exit 2."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from moecap_kernels.profile import main

PEAKS = ["--peak-bandwidth", "50e9", "--peak-flops", "500e9"]
FAST = ["--warmup", "1", "--reps", "3", *PEAKS]


def tiny_config(folder: Path, *, hidden=64, inter=48, experts=8, top_k=2, **extra) -> Path:
    """A Mixtral-layout config.json for a layer small enough to run in a blink."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "model_type": "mixtral",
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_local_experts": experts,
        "num_experts_per_tok": top_k,
        "torch_dtype": "float32",
        **extra,
    }
    path = folder / "config.json"
    path.write_text(json.dumps(config))
    return path


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


def bad_trace(tmp_path: Path, content) -> str:
    np.save(tmp_path / "t.npy", np.asarray(content))
    return f"trace:{tmp_path / 't.npy'}"


BAD = {
    "unknown model": (lambda p: ["--model", "gpt-17"], "unknown model"),
    "malformed config": (lambda p: ["--config", str(_write(p / "c.json", "{not json"))], "c.json"),
    "k > E": (lambda p: ["--config", str(tiny_config(p / "k", experts=2, top_k=3))], "top_k"),
    "zero batch": (lambda p: ["--model", "olmoe-1b-7b", "--batch", "0"], "positive"),
    "bad batch": (lambda p: ["--model", "olmoe-1b-7b", "--batch", "1,x"], "integers"),
    "bad dtype": (lambda p: ["--model", "olmoe-1b-7b", "--dtype", "int8"], "dtype"),
    "bad device": (lambda p: ["--device", "tpu"], "device"),
    "no gpu": (lambda p: ["--device", "cuda"], "CUDA"),
    "unknown backend": (lambda p: ["--backend", "magic"], "unknown backend"),
    "out-of-range id": (lambda p: ["--config", str(tiny_config(p / "m")),
                                   "--routing", bad_trace(p, [[0, 9]])], "out of range"),
    "malformed trace": (lambda p: ["--config", str(tiny_config(p / "m")), "--routing",
                                   "trace:" + str(_write(p / "x.npy", "garbage"))], "not a readable"),
    "trace vs batch": (lambda p: ["--config", str(tiny_config(p / "m")), "--batch", "4",
                                  "--routing", bad_trace(p, [[0, 1]] * 3)], "T=3"),
    "too big": (lambda p: ["--model", "deepseek-v3", "--dtype", "float32", "--device", "cpu"], "GiB"),
    "bad routing": (lambda p: ["--routing", "zipf:-2"], "zipf"),
    "bad flag": (lambda p: ["--frobnicate"], "unrecognized"),
    "seq-len on decode": (lambda p: ["--seq-len", "5"], "prefill"),
    "bad peak": (lambda p: ["--peak-bandwidth", "fast"], "rate"),
    "unwritable json": (lambda p: ["--config", str(tiny_config(p / "m")), "--json", str(p / "no" / "o.json")],
                        "No such file"),
}  # fmt: skip


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, case):
    if case == "no gpu" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU, so --device cuda is not bad input here")
    make_args, needle = BAD[case]
    code, _, err = run_cli(capsys, *make_args(tmp_path), *FAST)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("moecap: error:") and needle in lines[0], err


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
