"""spec_from_hf_config: each family's real key layout, preset round trips, and one-line failures."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moecap_kernels.errors import UserError
from moecap_kernels.hf_config import read_hf_config, spec_from_hf_config
from moecap_kernels.spec import MoESpec, list_presets, load_preset
from tests.helpers import spec_layer, spec_shape

Config = dict[str, Any]


def write_config(folder: Path, config: Any, name: str = "config.json") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(json.dumps(config))
    return path


# --- configs in each family's layout, written from a MoESpec ------------------------------------


def mixtral(s: MoESpec) -> Config:
    return {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "hidden_act": s.activation,
        "hidden_size": s.hidden_size,
        "intermediate_size": s.intermediate_size,
        "num_local_experts": s.num_experts,
        "num_experts_per_tok": s.top_k,
        "torch_dtype": "bfloat16",
    }


def qwen2_moe(s: MoESpec) -> Config:
    return {
        "architectures": ["Qwen2MoeForCausalLM"],
        "model_type": "qwen2_moe",
        "hidden_size": s.hidden_size,
        "intermediate_size": 4 * s.hidden_size,  # the dense width, not an expert's
        "moe_intermediate_size": s.intermediate_size,
        "shared_expert_intermediate_size": s.shared_intermediate_size,
        "num_experts": s.num_experts,
        "num_experts_per_tok": s.top_k,
        "norm_topk_prob": s.renormalize,
    }


def qwen3_moe(s: MoESpec) -> Config:
    config = qwen2_moe(s)
    del config["shared_expert_intermediate_size"]
    return {**config, "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe"}


def deepseek(model_type: str, architecture: str) -> Callable[[MoESpec], Config]:
    def write(s: MoESpec) -> Config:
        return {
            "architectures": [architecture],
            "model_type": model_type,
            "hidden_size": s.hidden_size,
            "intermediate_size": 9 * s.hidden_size,  # the dense layers' width, not an expert's
            "moe_intermediate_size": s.intermediate_size,
            "n_routed_experts": s.num_experts,
            "n_shared_experts": s.num_shared_experts,
            "num_experts_per_tok": s.top_k,
            "scoring_func": s.router_scoring,
            "norm_topk_prob": s.renormalize,
            "n_group": s.n_group,
            "topk_group": s.topk_group,
            "routed_scaling_factor": s.routed_scaling_factor,
            **({"topk_method": "group_limited_greedy"} if s.topk_method == "group_max" else {}),
        }

    return write


def dbrx(s: MoESpec) -> Config:
    return {
        "architectures": ["DbrxForCausalLM"],
        "model_type": "dbrx",
        "d_model": s.hidden_size,
        "ffn_config": {
            "ffn_act_fn": {"name": s.activation},
            "ffn_hidden_size": s.intermediate_size,
            "moe_num_experts": s.num_experts,
            "moe_top_k": s.top_k,
            "moe_normalize_expert_weights": s.norm_p if s.renormalize else None,
        },
    }


def olmoe(s: MoESpec) -> Config:
    return {
        "architectures": ["OlmoeForCausalLM"],
        "model_type": "olmoe",
        "hidden_size": s.hidden_size,
        "intermediate_size": s.intermediate_size,
        "num_experts": s.num_experts,
        "num_experts_per_tok": s.top_k,
        "norm_topk_prob": s.renormalize,
    }


def gpt_oss(s: MoESpec) -> Config:
    return {
        "architectures": ["GptOssForCausalLM"],
        "model_type": "gpt_oss",
        "hidden_size": s.hidden_size,
        "intermediate_size": s.intermediate_size,
        "num_local_experts": s.num_experts,
        "num_experts_per_tok": s.top_k,
        "experts_per_token": s.top_k,
    }


PRESET_LAYOUT: dict[str, Callable[[MoESpec], Config]] = {
    "mixtral-8x7b": mixtral,
    "mixtral-8x22b": mixtral,
    "dbrx": dbrx,
    "qwen1.5-moe-a2.7b": qwen2_moe,
    "qwen2-57b-a14b": qwen2_moe,
    "qwen3-30b-a3b": qwen3_moe,
    "qwen3-235b-a22b": qwen3_moe,
    "deepseek-v2-lite": deepseek("deepseek_v2", "DeepseekV2ForCausalLM"),
    "deepseek-v2": deepseek("deepseek_v2", "DeepseekV2ForCausalLM"),
    "deepseek-v3": deepseek("deepseek_v3", "DeepseekV3ForCausalLM"),
    "kimi-k2": deepseek("kimi_k2", "DeepseekV3ForCausalLM"),
    "olmoe-1b-7b": olmoe,
    "gpt-oss-20b": gpt_oss,
    "gpt-oss-120b": gpt_oss,
}


# the quantization_config a checkpoint in each preset's weight format carries
QUANTIZATION_CONFIGS = {
    "fp8-block": {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]},
    "mxfp4": {"quant_method": "mxfp4", "modules_to_not_convert": []},
}


@pytest.mark.parametrize("name", list_presets())
def test_every_preset_round_trips_through_its_family_layout(tmp_path: Path, name: str) -> None:
    assert name in PRESET_LAYOUT, f"add preset {name!r} to PRESET_LAYOUT"
    preset = load_preset(name)
    config = PRESET_LAYOUT[name](preset)
    if preset.weight_format != "none":
        config["quantization_config"] = QUANTIZATION_CONFIGS[preset.weight_format]
    spec = spec_from_hf_config(write_config(tmp_path / name, config))
    assert spec_layer(spec) == spec_layer(preset)
    assert spec.checkpoint_format == preset.checkpoint_format
    assert spec.name == name and spec.weight_dtype == spec.act_dtype == "bfloat16"


# --- literal configs in the real layouts ------------------------------------------------------


REAL = {
    "qwen2-57b": (
        {
            "_name_or_path": "Qwen/Qwen2-57B-A14B",
            "model_type": "qwen2_moe",
            "hidden_size": 3584,
            "intermediate_size": 18944,
            "moe_intermediate_size": 2560,
            "num_experts": 64,
            "num_experts_per_tok": 8,
            "shared_expert_intermediate_size": 20480,
            "norm_topk_prob": False,
            "torch_dtype": "bfloat16",
        },
        (3584, 2560, 64, 8, 1, 20480, "softmax", False),
    ),
    "deepseek-v2-lite": (
        {
            "model_type": "deepseek_v2",
            "hidden_size": 2048,
            "intermediate_size": 10944,
            "moe_intermediate_size": 1408,
            "n_routed_experts": 64,
            "n_shared_experts": 2,
            "num_experts_per_tok": 6,
            "norm_topk_prob": False,
            "scoring_func": "softmax",
            "q_lora_rank": None,
        },
        (2048, 1408, 64, 6, 2, 1408, "softmax", False),
    ),
    "deepseek-v3-defaults": (  # no scoring_func / norm_topk_prob: the DeepSeek-V3 defaults apply
        {
            "model_type": "deepseek_v3",
            "hidden_size": 7168,
            "moe_intermediate_size": 2048,
            "n_routed_experts": 256,
            "n_shared_experts": 1,
            "num_experts_per_tok": 8,
        },
        (7168, 2048, 256, 8, 1, 2048, "sigmoid", True),
    ),
    "dbrx-nested": (
        {
            "model_type": "dbrx",
            "d_model": 6144,
            "n_heads": 48,
            "ffn_config": {"ffn_hidden_size": 10752, "moe_num_experts": 16, "moe_top_k": 4},
        },
        (6144, 10752, 16, 4, 0, 0, "softmax", True),
    ),
    "olmoe": (
        {
            "model_type": "olmoe",
            "hidden_size": 2048,
            "intermediate_size": 1024,
            "num_experts": 64,
            "num_experts_per_tok": 8,
            "norm_topk_prob": False,
            "clip_qkv": None,
        },
        (2048, 1024, 64, 8, 0, 0, "softmax", False),
    ),
    "gpt-oss-original-keys": (
        {
            "model_type": "gpt_oss",
            "hidden_size": 2880,
            "intermediate_size": 2880,
            "num_experts": 128,
            "experts_per_token": 4,
            "swiglu_limit": 7.0,
        },
        (2880, 2880, 128, 4, 0, 0, "softmax_topk", False),
    ),
    "architectures-only": (
        {
            "architectures": ["MixtralForCausalLM"],
            "hidden_size": 4096,
            "intermediate_size": 14336,
            "num_local_experts": 8,
            "num_experts_per_tok": 2,
        },
        (4096, 14336, 8, 2, 0, 0, "softmax", True),
    ),
}


@pytest.mark.parametrize("case", REAL)
def test_real_layouts(tmp_path: Path, case: str) -> None:
    config, expected = REAL[case]
    assert spec_shape(spec_from_hf_config(write_config(tmp_path, config))) == expected


def test_name_prefers_name_or_path_then_folder(tmp_path: Path) -> None:
    config = mixtral(load_preset("mixtral-8x7b"))
    assert spec_from_hf_config(write_config(tmp_path / "my-mixtral", config)).name == "my-mixtral"
    recorded = {**config, "_name_or_path": "mistralai/Mixtral-8x7B-v0.1"}
    assert spec_from_hf_config(write_config(tmp_path / "x", recorded)).name == "mistralai/Mixtral-8x7B-v0.1"


def test_accepts_the_model_folder(tmp_path: Path) -> None:
    write_config(tmp_path / "olmoe", olmoe(load_preset("olmoe-1b-7b")))
    assert spec_from_hf_config(tmp_path / "olmoe").num_experts == 64


@pytest.mark.parametrize(
    ("requested", "in_config", "expected"),
    [
        (None, {"torch_dtype": "float16"}, "float16"),
        (None, {"dtype": "float32"}, "float32"),
        (None, {"torch_dtype": "float8_e4m3fn"}, "bfloat16"),
        (None, {}, "bfloat16"),
        ("fp16", {"torch_dtype": "float32"}, "float16"),
        ("bfloat16", {"torch_dtype": "float16"}, "bfloat16"),
    ],
)
def test_dtype_choice(tmp_path: Path, requested: str | None, in_config: Config, expected: str) -> None:
    without_dtype = {k: v for k, v in mixtral(load_preset("mixtral-8x7b")).items() if k != "torch_dtype"}
    spec = spec_from_hf_config(write_config(tmp_path, without_dtype | in_config), dtype=requested)
    assert spec.weight_dtype == spec.act_dtype == expected


# --- failures: one line, naming the file -------------------------------------------------------


def _base() -> Config:
    return mixtral(load_preset("mixtral-8x7b"))


def _deepseek_base() -> Config:
    return PRESET_LAYOUT["deepseek-v3"](load_preset("deepseek-v3"))


def _v2_base() -> Config:
    return PRESET_LAYOUT["deepseek-v2"](load_preset("deepseek-v2"))


BAD_CONFIGS: dict[str, tuple[Any, str]] = {
    "json-array": ([1, 2, 3], "JSON object"),
    "json-string": ("mixtral", "JSON object"),
    "unknown-moe-family": ({"model_type": "cohere2_moe", "num_experts": 16, "hidden_size": 8}, "unsupported"),
    "longcat-zero-experts": ({"model_type": "longcat_flash", "n_routed_experts": 512}, "zero-computation"),
    "jetmoe": ({"model_type": "jetmoe", "num_local_experts": 8}, "mixture-of-attention"),
    "deepseek-v4-hash": ({"model_type": "deepseek_v4", "n_routed_experts": 256}, "hash routing"),
    "ernie-shared-bias": (
        {
            "model_type": "ernie4_5_moe",
            "hidden_size": 64,
            "moe_intermediate_size": 32,
            "moe_num_experts": 8,
            "moe_k": 2,
            "use_bias": True,
        },
        "use_bias",
    ),
    "v2-unknown-method": ({**_v2_base(), "topk_method": "noaux_tc"}, "topk_method"),
    "sparsemixer-eps": (
        {
            "model_type": "phimoe",
            "hidden_size": 8,
            "intermediate_size": 8,
            "num_local_experts": 4,
            "num_experts_per_tok": 2,
            "router_jitter_noise": -1,
        },
        "router_jitter",
    ),
    "dense-llama": ({"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008}, "dense"),
    "dense-no-type": ({"hidden_size": 4096}, "dense"),
    "dense-one-expert": ({**_base(), "num_local_experts": 1}, "dense"),
    "dense-null-experts": ({**_deepseek_base(), "n_routed_experts": None}, "dense"),
    "missing-hidden": ({k: v for k, v in _base().items() if k != "hidden_size"}, "hidden_size"),
    "missing-top-k": (
        {k: v for k, v in _base().items() if k != "num_experts_per_tok"},
        "num_experts_per_tok",
    ),
    "missing-ffn-config": ({"model_type": "dbrx", "d_model": 64}, "ffn_config"),
    "ffn-config-not-object": ({"model_type": "dbrx", "d_model": 64, "ffn_config": 3}, "ffn_config"),
    "missing-nested": (
        {"model_type": "dbrx", "d_model": 64, "ffn_config": {"moe_num_experts": 4, "moe_top_k": 2}},
        "ffn_config.ffn_hidden_size",
    ),
    "missing-qwen2-shared": (
        {
            k: v
            for k, v in qwen2_moe(load_preset("qwen2-57b-a14b")).items()
            if k != "shared_expert_intermediate_size"
        },
        "shared_expert_intermediate_size",
    ),
    "string-int": ({**_base(), "hidden_size": "4096"}, "hidden_size"),
    "float-int": ({**_base(), "intermediate_size": 14336.0}, "intermediate_size"),
    "bool-int": ({**_base(), "num_experts_per_tok": True}, "num_experts_per_tok"),
    "zero-hidden": ({**_base(), "hidden_size": 0}, "hidden_size"),
    "negative-shared": ({**_deepseek_base(), "n_shared_experts": -1}, "n_shared_experts"),
    "top-k-exceeds-experts": ({**_base(), "num_experts_per_tok": 9}, "top_k"),
    "bad-norm-flag": ({**_deepseek_base(), "norm_topk_prob": "yes"}, "norm_topk_prob"),
    "bad-scoring": ({**_v2_base(), "scoring_func": "sigmoid"}, "scoring_func"),
    "bad-activation": ({**_base(), "hidden_act": "relu"}, "relu"),
}


def _assert_one_line_naming(error: pytest.ExceptionInfo[UserError], path: Path, detail: str) -> None:
    message = str(error.value)
    assert str(path) in message
    assert detail in message
    assert "\n" not in message


@pytest.mark.parametrize("case", BAD_CONFIGS)
def test_bad_config_is_a_user_error(tmp_path: Path, case: str) -> None:
    config, detail = BAD_CONFIGS[case]
    path = write_config(tmp_path, config)
    with pytest.raises(UserError) as error:
        spec_from_hf_config(path)
    _assert_one_line_naming(error, path, detail)


@pytest.mark.parametrize(
    ("case", "content", "detail"),
    [
        ("not-json", b"{ hidden_size: 4096", "not valid JSON"),
        ("empty", b"", "not valid JSON"),
        ("binary", b"\xff\xfe\x00\x80garbage", "cannot read"),
    ],
)
def test_unparsable_file_is_a_user_error(tmp_path: Path, case: str, content: bytes, detail: str) -> None:
    path = tmp_path / f"{case}.json"
    path.write_bytes(content)
    with pytest.raises(UserError) as error:
        spec_from_hf_config(path)
    _assert_one_line_naming(error, path, detail)


@pytest.mark.parametrize("relative", ["missing.json", "empty-folder"])
def test_missing_file_is_a_user_error(tmp_path: Path, relative: str) -> None:
    (tmp_path / "empty-folder").mkdir()
    path = tmp_path / relative
    with pytest.raises(UserError) as error:
        spec_from_hf_config(path)
    _assert_one_line_naming(error, path, "not found")


def test_bad_dtype_argument_names_the_file(tmp_path: Path) -> None:
    path = write_config(tmp_path, _base())
    with pytest.raises(UserError) as error:
        spec_from_hf_config(path, dtype="int3")
    _assert_one_line_naming(error, path, "int3")


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 70000) | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)
KEYS = st.sampled_from(
    sorted({key for layout in PRESET_LAYOUT.values() for key in layout(load_preset("dbrx"))})
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(base=st.sampled_from(sorted(PRESET_LAYOUT)), changes=st.dictionaries(KEYS, JSON_VALUES, max_size=3))
def test_any_corruption_is_a_spec_or_a_user_error(tmp_path: Path, base: str, changes: Config) -> None:
    config = {**PRESET_LAYOUT[base](load_preset(base)), **changes}
    path = write_config(tmp_path, config)
    try:
        spec_from_hf_config(path)
    except UserError as exc:
        assert str(path) in str(exc) and "\n" not in str(exc)


# --- where each field came from (what --dry-run shows) -----------------------------------------


def _leaf_keys(config: Config, prefix: str = "") -> set[str]:
    keys = set()
    for key, value in config.items():
        keys.add(prefix + key)
        if isinstance(value, dict):
            keys |= _leaf_keys(value, f"{prefix}{key}.")
    return keys


@pytest.mark.parametrize("name", list_presets())
def test_every_field_names_its_origin_and_named_keys_exist(tmp_path: Path, name: str) -> None:
    config = PRESET_LAYOUT[name](load_preset(name))
    spec, origins = read_hf_config(write_config(tmp_path, config))
    assert set(origins) == {f.name for f in dataclasses.fields(spec)}
    keys = _leaf_keys(config)
    for field in ("hidden_size", "intermediate_size", "num_experts", "top_k"):
        assert origins[field] in keys, (field, origins[field])  # the very key it was read from
    for field, origin in origins.items():  # an origin that is one word names a key that exists
        first = origin.split(" ")[0]
        assert " " in origin or origin in keys or origin == "default", (field, origin)
        if first in keys or first.split(".")[0] in keys:
            continue
        assert not first.endswith("_size") and not first.startswith("num_"), (field, origin)


def test_origins_say_which_key_and_which_default(tmp_path: Path) -> None:
    config = {**mixtral(load_preset("mixtral-8x7b")), "torch_dtype": "float8_e4m3fn"}
    del config["hidden_act"]
    _, origins = read_hf_config(write_config(tmp_path, config))
    assert origins["num_experts"] == "num_local_experts"
    assert origins["activation"] == "hidden_act (absent: silu)"
    assert origins["renormalize"] == "renormalised over the top-k (Mixtral)"
    assert (
        origins["weight_dtype"].startswith("default bfloat16") and "float8_e4m3fn" in origins["weight_dtype"]
    )
    assert origins["gated"] == "default"
    _, forced = read_hf_config(write_config(tmp_path, config), dtype="fp16")
    assert forced["weight_dtype"] == forced["act_dtype"] == "--dtype"
    _, ds = read_hf_config(write_config(tmp_path, deepseek("deepseek_v3", "X")(load_preset("deepseek-v3"))))
    assert ds["shared_intermediate_size"].startswith("moe_intermediate_size")
    _, db = read_hf_config(write_config(tmp_path, dbrx(load_preset("dbrx"))))
    assert db["top_k"] == "ffn_config.moe_top_k" and db["activation"].startswith("ffn_config.ffn_act_fn.name")


# --- every family, in the keys its configs use (Hub files and transformers 5's save_pretrained) ---

BASE = {"hidden_size": 64, "num_experts_per_tok": 2}
FAMILY_CASES: dict[str, tuple[Config, dict[str, Any]]] = {
    "qwen3-moe saved by transformers 5": (
        {
            **BASE,
            "model_type": "qwen3_moe",
            "moe_intermediate_size": 32,
            "num_local_experts": 8,
            "norm_topk_prob": True,
        },
        {"num_experts": 8, "renormalize": True, "num_shared_experts": 0},
    ),
    "qwen3-next": (
        {
            **BASE,
            "model_type": "qwen3_next",
            "moe_intermediate_size": 32,
            "num_experts": 8,
            "shared_expert_intermediate_size": 48,
        },
        {
            "renormalize": True,
            "num_shared_experts": 1,
            "shared_intermediate_size": 48,
            "shared_expert_gate": True,
        },
    ),
    "qwen3-vl-moe (text_config)": (
        {
            "model_type": "qwen3_vl_moe",
            "text_config": {**BASE, "moe_intermediate_size": 32, "num_experts": 8},
        },
        {"num_experts": 8, "renormalize": True},
    ),
    "qwen3-omni-moe (thinker_config.text_config)": (
        {
            "model_type": "qwen3_omni_moe",
            "thinker_config": {
                "text_config": {
                    **BASE,
                    "moe_intermediate_size": 32,
                    "num_experts": 8,
                    "norm_topk_prob": False,
                }
            },
        },
        {"num_experts": 8, "renormalize": False},
    ),
    "qwen3.5-moe (text_config)": (
        {
            "model_type": "qwen3_5_moe",
            "text_config": {
                **BASE,
                "model_type": "qwen3_5_moe_text",
                "moe_intermediate_size": 32,
                "num_experts": 8,
                "shared_expert_intermediate_size": 16,
            },
        },
        {"renormalize": True, "shared_expert_gate": True, "shared_intermediate_size": 16},
    ),
    "minimax": (
        {**BASE, "model_type": "minimax", "intermediate_size": 32, "num_local_experts": 4},
        {"num_experts": 4, "renormalize": True},
    ),
    "flex-olmo": (
        {
            **BASE,
            "model_type": "flex_olmo",
            "intermediate_size": 32,
            "num_experts": 4,
            "norm_topk_prob": False,
        },
        {"renormalize": False},
    ),
    "phimoe": (
        {
            **BASE,
            "model_type": "phimoe",
            "intermediate_size": 32,
            "num_local_experts": 4,
            "router_jitter_noise": 0.02,
        },
        {"router_scoring": "sparsemixer", "sparsemixer_eps": 0.02, "top_k": 2, "renormalize": False},
    ),
    "deepseek-v2 group-limited": (
        {
            **BASE,
            "model_type": "deepseek_v2",
            "moe_intermediate_size": 32,
            "n_routed_experts": 8,
            "n_shared_experts": 2,
            "topk_method": "group_limited_greedy",
            "n_group": 4,
            "topk_group": 2,
            "routed_scaling_factor": 16.0,
        },
        {
            "topk_method": "group_max",
            "n_group": 4,
            "topk_group": 2,
            "routed_scaling_factor": 16.0,
            "num_shared_experts": 2,
            "shared_intermediate_size": 32,
            "renormalize": False,
        },
    ),
    "glm4-moe": (
        {
            **BASE,
            "model_type": "glm4_moe",
            "moe_intermediate_size": 32,
            "n_routed_experts": 8,
            "n_shared_experts": 1,
        },
        {"topk_method": "group_top2_sum", "selection_bias": True, "n_group": 1, "routed_scaling_factor": 1.0},
    ),
    "glm4v-moe (text_config)": (
        {
            "model_type": "glm4v_moe",
            "text_config": {**BASE, "moe_intermediate_size": 32, "n_routed_experts": 8},
        },
        {"selection_bias": True, "num_shared_experts": 1},
    ),
    "dots1": (
        {
            **BASE,
            "model_type": "dots1",
            "moe_intermediate_size": 32,
            "n_routed_experts": 8,
            "n_shared_experts": 2,
        },
        {"renormalize": False, "num_shared_experts": 2, "selection_bias": True},
    ),
    "kimi-linear (its own key names)": (
        {
            "model_type": "kimi_linear",
            "hidden_size": 64,
            "moe_intermediate_size": 32,
            "num_experts": 8,
            "num_experts_per_token": 2,
            "num_expert_group": 2,
            "topk_group": 1,
            "moe_renormalize": False,
            "num_shared_experts": 1,
        },
        {"n_group": 2, "topk_group": 1, "renormalize": False, "routed_scaling_factor": 2.446},
    ),
    "bailing-hybrid": (
        {
            **BASE,
            "model_type": "bailing_hybrid",
            "moe_intermediate_size": 32,
            "num_experts": 16,
            "n_group": 8,
            "topk_group": 4,
        },
        {"n_group": 8, "topk_group": 4, "routed_scaling_factor": 2.5},
    ),
    "dbrx p-norm": (
        {
            "model_type": "dbrx",
            "d_model": 64,
            "ffn_config": {
                "ffn_hidden_size": 32,
                "moe_num_experts": 4,
                "moe_top_k": 2,
                "moe_normalize_expert_weights": 2,
            },
        },
        {"norm_p": 2.0, "renormalize": True},
    ),
    "dbrx no normalisation": (
        {
            "model_type": "dbrx",
            "d_model": 64,
            "ffn_config": {
                "ffn_hidden_size": 32,
                "moe_num_experts": 4,
                "moe_top_k": 2,
                "moe_normalize_expert_weights": None,
            },
        },
        {"renormalize": False},
    ),
    "gpt-oss": (
        {
            **BASE,
            "model_type": "gpt_oss",
            "intermediate_size": 32,
            "num_local_experts": 4,
            "swiglu_limit": 5.0,
        },
        {
            "activation": "swiglu_oai",
            "swiglu_limit": 5.0,
            "swiglu_alpha": 1.702,
            "router_bias": True,
            "expert_bias": True,
            "router_scoring": "softmax_topk",
        },
    ),
    "llama4 (text_config)": (
        {
            "model_type": "llama4",
            "text_config": {
                **BASE,
                "intermediate_size": 32,
                "num_local_experts": 4,
                "num_experts_per_tok": 1,
            },
        },
        {
            "weights_on_input": True,
            "router_scoring": "sigmoid",
            "renormalize": False,
            "num_shared_experts": 1,
            "shared_intermediate_size": 32,
            "top_k": 1,
        },
    ),
    "granitemoe": (
        {**BASE, "model_type": "granitemoe", "intermediate_size": 32, "num_local_experts": 4},
        {"router_scoring": "softmax_topk", "num_shared_experts": 0},
    ),
    "granitemoeshared": (
        {
            **BASE,
            "model_type": "granitemoeshared",
            "intermediate_size": 32,
            "num_local_experts": 4,
            "shared_intermediate_size": 48,
        },
        {"num_shared_experts": 1, "shared_intermediate_size": 48},
    ),
    "granitemoehybrid (shared MLP by default)": (
        {**BASE, "model_type": "granitemoehybrid", "intermediate_size": 32, "num_local_experts": 4},
        {"num_shared_experts": 1, "shared_intermediate_size": 1024},
    ),
    "hunyuan (top-k listed per layer)": (
        {
            "model_type": "hunyuan_v1_moe",
            "hidden_size": 64,
            "intermediate_size": 32,
            "num_experts": 8,
            "moe_topk": [2, 2, 2],
        },
        {"top_k": 2, "num_shared_experts": 1, "shared_intermediate_size": 32, "renormalize": True},
    ),
    "ernie-4.5-moe": (
        {
            "model_type": "ernie4_5_moe",
            "hidden_size": 64,
            "moe_intermediate_size": 32,
            "moe_num_experts": 8,
            "moe_k": 2,
            "moe_num_shared_experts": 2,
        },
        {
            "selection_bias": True,
            "renormalize": True,
            "num_shared_experts": 2,
            "shared_intermediate_size": 32,
        },
    ),
    "jamba": (
        {**BASE, "model_type": "jamba", "intermediate_size": 32, "num_experts": 4},
        {"renormalize": False},
    ),
}


@pytest.mark.parametrize("case", list(FAMILY_CASES))
def test_each_family_reads_its_semantics(tmp_path: Path, case: str) -> None:
    config, expected = FAMILY_CASES[case]
    spec, origins = read_hf_config(write_config(tmp_path, config))
    assert {k: getattr(spec, k) for k in expected} == expected
    assert all(origins[k] for k in expected)


@pytest.mark.parametrize(
    ("quantization_config", "described", "profiled_as"),
    [
        (QUANTIZATION_CONFIGS["fp8-block"], "fp8 (e4m3 weights with 128×128", "fp8-block"),
        ({"quant_method": "fp8", "fmt": "e4m3"}, "fp8 (e4m3 weights with per-tensor", "fp8-tensor"),
        ({"quant_method": "fp8", "weight_block_size": [64, 64]}, "fp8 (e4m3 weights with 64×64", "none"),
        (QUANTIZATION_CONFIGS["mxfp4"], "mxfp4 (e2m1 with e8m0 scales per 32", "mxfp4"),
        (
            {"quant_method": "gptq", "bits": 4, "group_size": 128},
            "gptq (4 bits, 128 group_size)",
            "int4-g128",
        ),
        ({"quant_method": "gptq", "bits": 4, "group_size": 64, "sym": False}, "gptq", "int4-g64-zp"),
        ({"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True}, "awq", "int4-g128-zp"),
        ({"quant_method": "gptq", "bits": 8, "group_size": -1, "sym": True}, "gptq (8 bits", "int8"),
        ({"quant_method": "gptq", "bits": 3, "group_size": 128}, "gptq (3 bits", "none"),
        ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "bitsandbytes", "none"),
    ],
)
def test_quantization_config_is_stated_and_profiled_in_its_format(
    tmp_path: Path, quantization_config: Config, described: str, profiled_as: str
) -> None:
    config = {**mixtral(load_preset("mixtral-8x7b")), "quantization_config": quantization_config}
    spec, origins = read_hf_config(write_config(tmp_path, config))
    assert (
        spec.checkpoint_format.startswith(described) and origins["checkpoint_format"] == "quantization_config"
    )
    assert spec.weight_format == profiled_as and origins["weight_format"].startswith("quantization_config")
    assert spec.weight_dtype == "bfloat16"  # the dtype the experts are quantized from
