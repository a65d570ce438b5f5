"""The benchmark scripts on tiny layers: compare's interleaved rows, the tuner's choice, the GPU summary,
the CPU kernel bench."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from moecap_kernels import hardware
from moecap_kernels.errors import UserError
from moecap_kernels.kernels.configs import KernelConfig
from moecap_kernels.profile import main as profile_main
from moecap_kernels.runner import Scenario
from moecap_kernels.timing import TimingStats
from moecap_kernels.weights import random_weights
from tests.helpers import tiny_spec

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
CPU = torch.device("cpu")


def load_script(name: str):
    if str(BENCHMARKS) not in sys.path:  # as when run as a script: its folder first on the path
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the script is executed
    spec.loader.exec_module(module)
    return module


def test_compare_layer_rows_speedups_and_overhead():
    compare = load_script("compare")
    spec = tiny_spec().with_dtype("float32")
    info = hardware.detect_device(CPU)
    peaks = hardware.Peaks(40e9, 200e9, "float32", "user", "user")
    scenarios = (Scenario("decode", 3), Scenario("prefill", 1, 16))
    rows = compare.compare_layer(
        spec, scenarios, ("loop", "grouped"), CPU, info, peaks, {"decode": 3, "prefill": 2}, compare.Console()
    )
    assert [(r.phase, r.tokens, r.backend) for r in rows] == [
        ("decode", 3, "loop"), ("decode", 3, "grouped"), ("prefill", 16, "loop"), ("prefill", 16, "grouped")
    ]  # fmt: skip
    for loop, grouped in (rows[0:2], rows[2:4]):
        assert grouped.speedup_vs_loop == loop.median_s / grouped.median_s
    assert all((r.counting_overhead is None) == (r.backend == "loop") for r in rows)
    assert all(r.roofline_s == max(r.compulsory_bytes / 40e9, r.useful_flops / 200e9) for r in rows)
    assert all(r.counting_cost_s > 0 and r.small_op_after_run_s > 0 for r in rows)  # both timed in place
    checks = {
        "calibrated_read_bandwidth": 40e9,
        "calibrated_gemm_flops": 200e9,
        "bandwidth_checks": {"torch sum": {"bytes_per_s": 30e9, "ratio_to_calibrated": 0.75}},
        "gemm_check": {"torch.matmul": 100e9, "ratio_to_calibrated": 0.5},
    }
    text = compare.markdown(rows, checks, {"device": "cpu", "dtype": "float32"})
    assert text.count("| tiny |") == 4 and "0.75" in text
    table = text[text.index("| model") :].splitlines()
    assert len({line.count("|") for line in table}) == 1  # header, separator and rows agree
    no_checks = compare.markdown(rows, {}, {"device": "cuda", "dtype": "float32"})  # a GPU run: no checks
    assert "ceiling check" not in no_checks and no_checks.count("| tiny |") == 4


def _fixed_timings(monkeypatch, tuner, seconds: list[float | None]) -> None:
    """The tuner's timer, returning ``seconds`` in call order (None: the config fails to compile)."""
    remaining = iter(seconds)

    def fake_time_region(run, device, *, warmup, reps, **kwargs):
        value = next(remaining)
        if value is None:
            raise RuntimeError("out of shared memory")
        return TimingStats((value,), "fake")

    monkeypatch.setattr(tuner, "time_region", fake_time_region)


@pytest.mark.parametrize("seconds, chosen", [([2e-3, 1e-3, 3e-3], 1), ([1e-3, None, 2e-3], 0)])
def test_tuner_picks_the_fastest_candidate(monkeypatch, seconds, chosen):
    pytest.importorskip("triton")
    tuner = load_script("tune_triton")
    _fixed_timings(monkeypatch, tuner, seconds)
    spec = tiny_spec(hidden_size=32, intermediate_size=32).with_dtype("float16")
    options = [KernelConfig(16, 32, 32), KernelConfig(32, 32, 16), KernelConfig(16, 16, 16)]
    best = tuner.tune(spec, [4], CPU, configs=lambda tokens, s: options, reps=1)
    assert best == {4: (options[chosen], seconds[chosen])}


def test_tuner_says_so_when_every_candidate_fails(monkeypatch):
    pytest.importorskip("triton")
    tuner = load_script("tune_triton")
    _fixed_timings(monkeypatch, tuner, [None, None])
    spec = tiny_spec(hidden_size=32, intermediate_size=32).with_dtype("float16")
    options = [KernelConfig(16, 32, 32), KernelConfig(32, 32, 16)]
    with pytest.raises(UserError, match="all 2 candidate configs failed"):
        tuner.tune(spec, [4], CPU, configs=lambda tokens, s: options, reps=1)


def test_tuner_candidates_start_with_the_heuristic_and_never_repeat():
    pytest.importorskip("triton")
    tuner = load_script("tune_triton")
    spec = tiny_spec().with_dtype("bfloat16")
    for tokens in (1, 64, 4096):
        launches = [c.as_list() for c in tuner.candidates(tokens, spec)]
        assert launches[0] == tuner.heuristic_config(tokens, 8, 2, 48, 40, 2, True).as_list()
        assert len(launches) == len({tuple(c) for c in launches})


def test_tuner_refuses_without_gpu(capsys):
    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    assert load_script("tune_triton").main(["--model", "mixtral-8x7b"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_gpu_summary_table_from_profile_json(tmp_path, capsys):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model_type": "mixtral", "hidden_size": 32, "intermediate_size": 32,
                                  "num_local_experts": 4, "num_experts_per_tok": 2}))  # fmt: skip
    out = tmp_path / "r.json"
    args = ["--config", str(config), "--batch", "2", "--backend", "loop", "--reps", "2", "--json", str(out)]
    assert profile_main([*args, "--peak-bandwidth", "1e10", "--peak-flops", "1e11"]) == 0
    capsys.readouterr()
    load_script("gpu_summary").table([str(out)], None, str(tmp_path / "summary.md"))
    summary = (tmp_path / "summary.md").read_text()
    assert summary.count("\n") == 3 and "| loop |" in summary


def test_gpu_summary_merges_and_reports_against_the_goals(tmp_path):
    summary = load_script("gpu_summary")
    row = {"model": "mixtral-8x7b", "phase": "decode", "tokens": 1, "backend": "triton",
           "weight_format": "none", "s_mbu": 0.9, "s_mfu": 0.1,
           "peak": {"source": "datasheet: NVIDIA H200 SXM"},
           "kernel": {"load_amplification": 1.0}, "audit": {"read_over_counted": 1.08}}  # fmt: skip
    slow = {**row, "backend": "loop", "s_mbu": 0.5, "kernel": None, "audit": {"unavailable": "ncu absent"}}
    prefill = {**row, "phase": "prefill", "tokens": 4096, "s_mfu": 0.65, "kernel": None, "audit": None}
    lines = summary.goal_lines([row, slow, prefill])
    assert (
        "goal mixtral-8x7b decode T=1: best triton s_mbu 0.90 (meets 0.85 of datasheet: NVIDIA H200 SXM)"
        in lines
    )
    assert (
        "goal mixtral-8x7b prefill T=4096: best triton s_mfu 0.65 (misses 0.7 of datasheet: NVIDIA H200 SXM)"
        in lines
    )
    assert "goal load amplification mixtral-8x7b T=1 triton: 1.000 (meets ≤ 1.05)" in lines
    assert "goal audit mixtral-8x7b T=1 triton: DRAM read / counted 1.080 (misses within 5%)" in lines
    assert "audit mixtral-8x7b T=1 loop: ncu absent" in lines
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    first.write_text(json.dumps({"schema_version": 1, "command": "one", "results": [row]}))
    second.write_text(json.dumps({"schema_version": 1, "command": "two", "results": [prefill]}))
    summary.merge([str(first), str(second)], str(tmp_path / "m.json"))
    merged = json.loads((tmp_path / "m.json").read_text())
    assert merged["command"] == "one && two" and [r["phase"] for r in merged["results"]] == [
        "decode",
        "prefill",
    ]


def test_cpu_kernel_bench_measures_a_tiny_layer():
    bench = load_script("cpu_kernel_bench")
    reason = bench.unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    spec = tiny_spec().with_dtype("bfloat16")
    probe = bench.StreamProbe(1 << 20)
    row = bench.measure(spec, random_weights(spec), 3, 2, probe)
    assert row.tokens == 3 and len(probe.samples) == 2 * 4  # one streaming pass before each timed run
    assert all(v > 0 and math.isfinite(v) for v in (row.op_s, row.op_gbs, row.frac_paired))
    assert all(v > 0 and math.isfinite(v) for v in (row.loop_s, row.gemm_s, row.backend_s))


def test_first_run_table_has_each_step_its_median_and_the_calibrations_own_report():
    first_run = load_script("first_run")
    steps = first_run.steps(with_tests=True)
    assert [s.name for s in steps] == [
        "extension build", "quick calibration", "full calibration",
        "default profile, first run", "default profile, cached", "test suite",
    ]  # fmt: skip
    assert steps[3].cache == steps[4].cache != steps[0].cache  # the cached run finds the first run's cache
    for step, walls in zip(steps, ([20.0, 10.0, 12.0], [3.0], [7.0], [30.0], [11.0], [80.0]), strict=True):
        step.wall_s = walls
    steps[1].reports = [
        {"duration_s": 1.2, "stable": False, "why": "others took 40%", "read_GBps": 40.0,
         "read_spread": 0.02, "bf16_GFLOPs": 440.0, "gemm_spread": 0.01, "others_cpu_share": 0.4},
    ]  # fmt: skip
    steps[4].calibrated = [False]
    text = first_run.markdown(steps, {"machine": "test CPU", "date": "2026-12-01"})
    assert "| extension build | 12.0 s (10.0–20.0) | 3 |" in text
    assert "| default profile, cached | 11.0 s (11.0–11.0) | 1, calibrated in 0 of them |" in text
    assert "no: others took 40%" in text and "40.0 (2.0%)" in text and "40.0%" in text


def test_read_over_time_buckets_every_read_of_one_buffer():
    read_over_time = load_script("read_over_time")
    buckets = read_over_time.read_for(1.2, 1 << 20)
    starts = [t for t, _ in buckets]
    assert starts[0] == 0.0 and starts == sorted(starts) and all(t < 1.2 for t in starts)
    assert all(rate > 0 for _, rate in buckets)


def test_compare_times_transformers_blocks_beside_the_backends():
    """A layer transformers has a block for gets one row per experts implementation, the same
    layer (checked against the float64 reference) in the same interleaving."""
    pytest.importorskip("transformers")
    compare = load_script("compare")
    spec = tiny_spec(name="olmoe-tiny", renormalize=False).with_dtype("float32")
    info = hardware.detect_device(CPU)
    peaks = hardware.Peaks(40e9, 200e9, "float32", "user", "user")
    rows = compare.compare_layer(
        spec,
        (Scenario("decode", 3),),
        ("loop", "grouped"),
        CPU,
        info,
        peaks,
        {"decode": 3},
        compare.Console(),
    )
    by_name = {r.backend: r for r in rows}
    assert set(by_name) == {
        "loop",
        "grouped",
        "transformers:eager",
        "transformers:grouped_mm",
        "transformers:batched_mm",
    }
    assert all(r.rel_error < 1e-5 for r in rows)  # decode rows: every contender checked
    for name in ("transformers:eager", "transformers:grouped_mm", "transformers:batched_mm"):
        r = by_name[name]
        assert r.counting_cost_s is None
        assert r.compulsory_bytes == by_name["loop"].compulsory_bytes
        assert r.speedup_vs_loop == by_name["loop"].median_s / r.median_s
    text = compare.markdown(rows, {}, {"device": "cpu", "dtype": "float32"})
    assert text.count("transformers:") >= 4 and "| — |" in text


def test_vs_transformers_tabulates_each_family(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    script = load_script("vs_transformers")
    assert script.main(["qwen2_moe", "gpt_oss", "--out", str(tmp_path)]) == 0
    (md,) = tmp_path.glob("vs-transformers-*.md")
    (record,) = tmp_path.glob("vs-transformers-*.json")
    families = json.loads(record.read_text())["families"]
    assert [f["family"] for f in families] == ["qwen2_moe", "gpt_oss"]
    for f in families:
        assert set(f["rel_error"]) == set(script.PATHS) and max(f["rel_error"].values()) < 1e-5
        assert f["same_topk_sets"] == f"{script.TOKENS}/{script.TOKENS}"
        assert f["flop_counter"] == f["project_flops"]
    assert "shared_expert_gate" in families[0]["features"] and "swiglu_oai" in families[1]["features"]
    assert md.read_text().count("| qwen2_moe |") == 1


def test_compare_formats_interleaves_every_format_with_its_own_paired_read():
    load_script("compare")  # puts benchmarks/ on the path
    formats_script = load_script("compare_formats")
    spec = tiny_spec(hidden_size=64, intermediate_size=32).with_dtype("float32")
    info = hardware.detect_device(CPU)
    peaks = {"float32": hardware.Peaks(40e9, 200e9, "float32", "user", "user")}
    rows = formats_script.compare_formats(
        spec, (Scenario("decode", 3),), ("none", "int8", "int4-g16"), ("loop", "dequant"),
        CPU, info, peaks, {"decode": 3}, formats_script.Console(),
    )  # fmt: skip
    assert [(r.weight_format, r.backend) for r in rows] == [
        ("none", "loop"), ("int8", "dequant"), ("int4-g16", "dequant")
    ]  # fmt: skip
    assert [r.expert_bytes for r in rows] == [
        spec.with_format(f).expert_weight_bytes for f in ("none", "int8", "int4-g16")
    ]
    loop = rows[0]
    assert loop.speedup_vs_none == 1.0 and rows[1].speedup_vs_none is None
    assert rows[1].speedup_vs_fastest_none == loop.median_s / rows[1].median_s
    assert all(r.kernel_rel_error < 1e-5 for r in rows)
    assert rows[0].quant_rel_error == rows[0].kernel_rel_error and rows[2].quant_rel_error > 1e-2
    table = formats_script.markdown(rows)
    assert len({line.count("|") for line in table}) == 1 and len(table) == 2 + len(rows)
