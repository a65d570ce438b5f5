"""``advise``: the whole-model facts of the presets, the fit and the projection against hand-worked
figures, and the CLI (PROJECTED tables, JSON, one-line errors)."""

from __future__ import annotations

import json
import math

import pytest

from moecap_kernels.advise import main as advise_main
from moecap_kernels.metrics import traffic, work
from moecap_kernels.projection import Target, busiest_device, devices_needed, project
from moecap_kernels.spec import ModelFacts, list_presets, load_model_facts, load_preset
from tests.helpers import tiny_spec


@pytest.mark.parametrize("name", list_presets())
def test_every_preset_states_its_whole_model(name):
    spec, facts = load_preset(name), load_model_facts(name)
    assert 0 < facts.moe_layers <= facts.layers
    experts = facts.moe_layers * (
        spec.num_experts * spec.params_per_expert + spec.num_shared_experts * spec.params_per_shared_expert
    )
    assert 0.85 * facts.params < experts < facts.params  # MoE models are mostly experts, never more
    assert facts.weight_bytes(spec.with_format("none")) == pytest.approx(
        facts.params * spec.weight_bytes_per_param, rel=1e-9
    )


def test_weight_bytes_by_hand():
    spec = tiny_spec()  # H 48, F 40, E 8, gated, bf16
    facts = ModelFacts(params=100_000, layers=3, moe_layers=2, source="test")
    expert = 3 * 48 * 40  # params of one expert
    assert facts.expert_params(spec) == 2 * 8 * expert
    int8 = spec.with_format("int8")  # one byte per weight + one float32 scale per output row
    per_expert = 3 * 48 * 40 + (2 * 40 + 48) * 4
    assert int8.expert_weight_bytes == per_expert
    assert facts.weight_bytes(int8) == 2 * 8 * per_expert + (100_000 - 2 * 8 * expert) * 2


def test_devices_needed():
    assert devices_needed(100, 1000, 0.9) == 1
    assert devices_needed(900, 1000, 0.9) == 1
    assert devices_needed(901, 1000, 0.9) == 2
    assert devices_needed(901, 1000, 1.0) == 1
    assert devices_needed(10**12, 80 * 2**30, 0.9) == math.ceil(10**12 / (80 * 2**30 * 0.9))


def test_busiest_device_on_one_device_is_the_layer():
    spec = tiny_spec(num_shared_experts=1, shared_intermediate_size=24)
    counts = [3, 0, 1, 0, 0, 2, 0, 2]  # 8 pairs of 4 tokens, 4 experts hit
    nbytes, nflops = busiest_device(spec, counts, 1)
    assert nbytes == traffic(spec, 4, 4 * spec.expert_weight_bytes).compulsory
    assert nflops == work(spec, 4, 8 * 2 * spec.params_per_expert).useful


def test_busiest_device_of_two_by_hand():
    spec = tiny_spec()
    counts = [3, 0, 1, 0, 0, 2, 0, 2]  # device 0 holds experts 0-3 (2 hit, 4 pairs), device 1 4-7 (2 hit, 4)
    rest_bytes = traffic(spec, 4, 0).compulsory
    rest_flops = work(spec, 4, 0).useful
    nbytes, nflops = busiest_device(spec, counts, 2)
    assert nbytes == 2 * spec.expert_weight_bytes + math.ceil(rest_bytes / 2)
    assert nflops == 4 * 2 * spec.params_per_expert + math.ceil(rest_flops / 2)
    skewed = [4, 2, 1, 1, 0, 0, 0, 0]  # device 0: 4 hit, 8 pairs
    assert busiest_device(spec, skewed, 2)[0] == 4 * spec.expert_weight_bytes + math.ceil(rest_bytes / 2)


def test_projection_by_hand():
    spec = tiny_spec()
    facts = ModelFacts(params=50_000, layers=4, moe_layers=4, source="test")
    target = Target("dev", 10**6, 1e9, 1e12, 0.5, 0.5, "assumed", "test", usd_per_hour=3.6)
    p = project(spec, facts, [1, 1, 0, 0, 0, 0, 0, 0], target, 0.9)
    nbytes, nflops = busiest_device(spec, [1, 1, 0, 0, 0, 0, 0, 0], 1)
    assert p.devices == 1 and p.tokens == 1
    assert p.layer_time_s == pytest.approx(max(nbytes / 0.5e9, nflops / 0.5e12))
    assert p.bound == "memory"
    assert p.tokens_per_s == pytest.approx(1 / (4 * p.layer_time_s))
    assert p.usd_per_mtok == pytest.approx(3.6 / (p.tokens_per_s * 3600) * 1e6)
    assert p.to_dict()["projected"] is True


def test_deepseek_v3_fits_by_format_with_the_projection(tmp_path, capsys):
    out = tmp_path / "advice.json"
    argv = ["--model", "deepseek-v3", "--scenario", "decode:1,64", "--no-local", "--json", str(out)]
    assert advise_main(argv) == 0
    doc = json.loads(out.read_text())
    assert doc["projected"] is True and doc["model"] == "deepseek-v3"
    rows = doc["projections"]
    assert {r["weight_format"] for r in rows} == {"none", "fp8-block", "int4-g128"}
    assert {r["tokens"] for r in rows} == {1, 64}
    h200 = {r["weight_format"]: r for r in rows if r["device"] == "NVIDIA H200 SXM" and r["tokens"] == 1}
    bf16_bytes = 671e9 * 2  # every parameter in bfloat16
    assert h200["none"]["devices_needed"] == math.ceil(bf16_bytes / (141 * 2**30 * 0.9)) == 10
    assert h200["fp8-block"]["devices_needed"] < h200["none"]["devices_needed"]
    assert h200["int4-g128"]["devices_needed"] < h200["fp8-block"]["devices_needed"]
    for r in rows:
        assert r["layer_time_s"] > 0 and r["tokens_per_s"] > 0 and r["efficiency_source"] == "assumed on cuda"
    priced = [r for r in rows if r["usd_per_mtok"] is not None]
    assert priced and all(r["price_source"] for r in priced)
    printed = capsys.readouterr().out
    assert "devices needed to hold the weights (PROJECTED fit)" in printed
    assert "decode T = 64: PROJECTED, ranked by $/Mtok" in printed
    assert "no communication counted" in printed and "assumed on cuda" in printed


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "nope"], "unknown model 'nope'"),
        (["--model", "mixtral-8x7b", "--scenario", "serve:4"], "expected decode:T[,T…] or prefill:T[,T…]"),
        (["--model", "mixtral-8x7b", "--devices", "h999"], "--devices: unknown h999"),
        (["--model", "mixtral-8x7b", "--quant", "int4-g5"], "weight format 'int4-g5'"),
        (["--model", "mixtral-8x7b", "--usable-memory", "1.5"], "expected a fraction above 0, at most 1"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(capsys, argv, message):
    assert advise_main([*argv, "--no-local"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
