"""The shipped presets: each loads, is named after its file, and carries the published figures."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from moecap_kernels import spec as spec_module
from moecap_kernels.errors import UserError
from moecap_kernels.spec import MoESpec, list_presets, load_preset
from tests.helpers import spec_layer, spec_shape

PRESET_DIR = Path(spec_module.__file__).parent / "presets"
REQUIRED = (
    "mixtral-8x7b",
    "mixtral-8x22b",
    "dbrx",
    "qwen1.5-moe-a2.7b",
    "qwen2-57b-a14b",
    "qwen3-30b-a3b",
    "qwen3-235b-a22b",
    "deepseek-v2-lite",
    "deepseek-v3",
    "olmoe-1b-7b",
    "gpt-oss-20b",
)
FIELDS = {f.name for f in dataclasses.fields(MoESpec)}

# (name, H, F, E, k, S, F_s, router_scoring, renormalize) as published in each model's config.json.
PUBLISHED = [
    ("mixtral-8x7b", 4096, 14336, 8, 2, 0, 0, "softmax", True),
    ("mixtral-8x22b", 6144, 16384, 8, 2, 0, 0, "softmax", True),
    ("dbrx", 6144, 10752, 16, 4, 0, 0, "softmax", True),
    ("qwen1.5-moe-a2.7b", 2048, 1408, 60, 4, 1, 5632, "softmax", False),
    ("qwen2-57b-a14b", 3584, 2560, 64, 8, 1, 20480, "softmax", False),
    ("qwen3-30b-a3b", 2048, 768, 128, 8, 0, 0, "softmax", True),
    ("qwen3-235b-a22b", 4096, 1536, 128, 8, 0, 0, "softmax", True),
    ("deepseek-v2-lite", 2048, 1408, 64, 6, 2, 1408, "softmax", False),
    ("deepseek-v3", 7168, 2048, 256, 8, 1, 2048, "sigmoid", True),
    ("olmoe-1b-7b", 2048, 1024, 64, 8, 0, 0, "softmax", False),
    ("gpt-oss-20b", 2880, 2880, 32, 4, 0, 0, "softmax_topk", False),
    ("gpt-oss-120b", 2880, 2880, 128, 4, 0, 0, "softmax_topk", False),
]

# The routing and expert features each published config.json sets (everything else: Mixtral's).
GPT_OSS = dict(
    router_bias=True, expert_bias=True, activation="swiglu_oai", swiglu_alpha=1.702, swiglu_limit=7.0
)
DEEPSEEK_V3 = dict(topk_method="group_top2_sum", selection_bias=True)
SEMANTICS = {
    "deepseek-v2": dict(topk_method="group_max", n_group=8, topk_group=3, routed_scaling_factor=16.0),
    "deepseek-v3": dict(**DEEPSEEK_V3, n_group=8, topk_group=4, routed_scaling_factor=2.5),
    "kimi-k2": dict(**DEEPSEEK_V3, n_group=1, topk_group=1, routed_scaling_factor=2.827),
    "qwen1.5-moe-a2.7b": dict(shared_expert_gate=True),
    "qwen2-57b-a14b": dict(shared_expert_gate=True),
    "gpt-oss-20b": GPT_OSS,
    "gpt-oss-120b": GPT_OSS,
}


def test_required_presets_ship() -> None:
    assert set(REQUIRED) <= set(list_presets())


@pytest.mark.parametrize("name", list_presets())
def test_preset_loads_and_is_named_after_its_file(name: str) -> None:
    raw = json.loads((PRESET_DIR / f"{name}.json").read_text())
    assert set(raw) == FIELDS | {"model"}, "a preset spells out every MoESpec field and its whole model"
    spec = load_preset(name)
    assert spec.name == name == raw["name"]
    assert spec.top_k <= spec.num_experts
    assert (spec.num_shared_experts == 0) == (spec.shared_intermediate_size == 0)
    assert spec.weight_dtype == spec.act_dtype == "bfloat16"
    assert spec.gated


@pytest.mark.parametrize("name", list_presets())
def test_preset_cites_its_config(name: str) -> None:
    source = load_preset(name).source
    assert "\n" not in source
    assert "config.json" in source
    repo_id = source.split()[0]
    assert repo_id.count("/") == 1, f"source should start with the HF repo id, got {repo_id!r}"


@pytest.mark.parametrize("expected", PUBLISHED, ids=[row[0] for row in PUBLISHED])
def test_published_figures(expected: tuple) -> None:
    assert spec_shape(load_preset(expected[0])) == expected[1:]


@pytest.mark.parametrize("name", list_presets())
def test_published_semantics(name: str) -> None:
    defaults = {f.name: f.default for f in dataclasses.fields(MoESpec) if f.name in SEMANTICS_FIELDS}
    layer = spec_layer(load_preset(name))
    assert {k: layer[k] for k in SEMANTICS_FIELDS} == {**defaults, **SEMANTICS.get(name, {})}


SEMANTICS_FIELDS = (
    "router_bias", "topk_method", "n_group", "topk_group", "selection_bias", "norm_p",
    "routed_scaling_factor", "sparsemixer_eps", "weights_on_input", "expert_bias", "activation",
    "swiglu_alpha", "swiglu_limit", "shared_expert_gate",
)  # fmt: skip


def test_lookup_is_case_insensitive() -> None:
    assert load_preset("  Mixtral-8x7B ") == load_preset("mixtral-8x7b")


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("hidden_size", 10**400, "an integer of 1329 bits"),
        ("hidden_size", 0, "from 1 to"),
        ("num_experts", 10**6, "from 1 to 65536"),
        ("num_shared_experts", -1, "from 0 to"),
        ("intermediate_size", 64.0, "must be an integer"),
        ("top_k", True, "must be an integer"),
    ],
)
def test_spec_fields_are_bounded(field: str, value: object, message: str) -> None:
    """A layer beyond any real model is bad input, not an overflow later on (sizes become floats)."""
    fields = {"name": "x", "hidden_size": 64, "intermediate_size": 32, "num_experts": 8, "top_k": 2}
    with pytest.raises(UserError, match=message):
        MoESpec(**{**fields, field: value})
