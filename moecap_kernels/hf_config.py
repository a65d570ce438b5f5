"""Build a MoESpec from a local Hugging Face ``config.json`` (no network access).

Each family stores its MoE layer under its own keys (Mixtral's ``num_local_experts``, DeepSeek's
``n_routed_experts``, DBRX's nested ``ffn_config``, ERNIE's ``moe_k``...), and computes it with its
own rules (group-limited top-k, a selection-only correction bias, a gated shared expert, biased
experts with a clamped SwiGLU...). One small reader per family maps both onto the package's
vocabulary (``spec``), from the Hub's files and from those ``save_pretrained`` writes (renamed
keys), and from the text part of composite configs (``text_config``, ``thinker_config``). Every
field says where it came from (the key, or the default taken when the key is absent), which
``--dry-run`` shows. A family whose rules the project cannot compute yet is refused with one line
naming the rule, never read as a different layer. Every failure is a one-line UserError that names
the file.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from moecap_kernels.dtypes import canonical_dtype
from moecap_kernels.errors import UserError
from moecap_kernels.limits import MAX_SMALL_FILE_BYTES
from moecap_kernels.spec import MoESpec

Config = dict[str, Any]

CONFIG_DTYPES = ("bfloat16", "float16", "float32")
ACTIVATION_NAMES = {
    "silu": "silu",
    "swish": "silu",
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",  # all three are the tanh approximation
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
}
# Keys whose presence marks a config as MoE even when its family is unknown to us.
EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
# Composite configs whose MoE layer lives in a nested text config.
NESTED = {
    "qwen3_vl_moe": ("text_config",),
    "qwen3_omni_moe": ("thinker_config", "text_config"),
    "qwen3_omni_moe_thinker": ("text_config",),
    "glm4v_moe": ("text_config",),
    "llama4": ("text_config",),
    "qwen3_5_moe": ("text_config",),
}
# Families recognised but refused: the rule the project cannot compute yet.
REFUSED = {
    "longcat_flash": "LongCat-Flash's zero-computation experts (identity experts chosen inside the top-k)",
    "jetmoe": "JetMoe's bias after the combine and its mixture-of-attention heads",
    "deepseek_v4": "DeepSeek-V4's hash routing (tid2eid) and sqrt-softplus scores",
}


class Sourced(NamedTuple):
    """A field's value and where it came from: a config key, or the default taken without one."""

    value: Any
    origin: str


def fixed(value: Any, why: str) -> Sourced:
    """A value the family's layout implies, with no key of its own."""
    return Sourced(value, why)


Fields = dict[str, Sourced]


class _Reader:
    """A parsed config plus the file it came from, so every error can name that file."""

    def __init__(self, path: Path, config: Config) -> None:
        self.path = path
        self.config = config

    def fail(self, problem: str) -> UserError:
        return UserError(f"{self.path}: {problem}")

    def section(self, key: str) -> _Reader:
        """A nested object (DBRX's ``ffn_config``), reported as ``key.sub`` in errors."""
        value = self._lookup(key)
        if not isinstance(value, dict):
            raise self.fail(f"key {self.label(key)!r} must be an object, got {_short(value)}")
        return _Section(self, key, value)

    def label(self, key: str) -> str:
        return key

    def has(self, key: str) -> bool:
        return self.config.get(key) is not None

    def _lookup(self, key: str) -> Any:
        if key not in self.config:
            raise self.fail(f"missing key {self.label(key)!r}")
        return self.config[key]

    def _first(self, keys: tuple[str, ...]) -> str:
        """The first of ``keys`` the config sets (families renamed keys across releases)."""
        return next((key for key in keys if key in self.config), keys[0])

    def integer(self, *keys: str, minimum: int = 1) -> Sourced:
        """A required integer under the first of ``keys`` present, at least ``minimum``."""
        key = self._first(keys)
        value = self._lookup(key)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(f"key {self.label(key)!r} must be an integer, got {_short(value)}")
        if value < minimum:
            raise self.fail(f"key {self.label(key)!r} must be >= {minimum}, got {value}")
        return Sourced(value, self.label(key))

    def optional_integer(self, *keys: str, default: int = 0, minimum: int = 0) -> Sourced:
        """An integer that may be absent or null (meaning ``default``)."""
        key = self._first(keys)
        if self.config.get(key) is None:
            return Sourced(default, f"{self.label(key)} (absent: {default})")
        return self.integer(key, minimum=minimum)

    def expert_count(self, *keys: str) -> Sourced:
        """The routed-expert count; null, 0 or 1 means the config describes a dense model."""
        key = self._first(keys)
        value = self._lookup(key)
        if value is None or (type(value) is int and value in (0, 1)):
            raise self.fail(f"describes a dense (non-MoE) model: {self.label(key)}={value!r}")
        return self.integer(key)

    def flag(self, *keys: str, default: bool) -> Sourced:
        key = self._first(keys)
        value = self.config.get(key)
        if value is None:
            return Sourced(default, f"{self.label(key)} (absent: {str(default).lower()})")
        if not isinstance(value, bool):
            raise self.fail(f"key {self.label(key)!r} must be true or false, got {_short(value)}")
        return Sourced(value, self.label(key))

    def number(self, *keys: str, default: float) -> Sourced:
        """A positive number that may be absent or null (meaning ``default``)."""
        key = self._first(keys)
        value = self.config.get(key)
        if value is None:
            return Sourced(float(default), f"{self.label(key)} (absent: {default:g})")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1e6:
            raise self.fail(f"key {self.label(key)!r} must be a positive number, got {_short(value)}")
        return Sourced(float(value), self.label(key))

    def choice(self, key: str, default: str, allowed: tuple[str, ...]) -> Sourced:
        value = self.config.get(key)
        if value is None:
            return Sourced(default, f"{self.label(key)} (absent: {default})")
        if value not in allowed:
            raise self.fail(f"key {self.label(key)!r} must be one of {allowed}, got {_short(value)}")
        return Sourced(value, self.label(key))

    def activation(self, key: str = "hidden_act", default: str = "silu") -> Sourced:
        value = self.config.get(key)
        if value is None:
            return Sourced(default, f"{self.label(key)} (absent: {default})")
        if not isinstance(value, str) or value.lower() not in ACTIVATION_NAMES:
            names = ", ".join(sorted(ACTIVATION_NAMES))
            raise self.fail(
                f"unsupported activation {self.label(key)}={_short(value)}; expected one of {names}"
            )
        return Sourced(ACTIVATION_NAMES[value.lower()], f"{self.label(key)} = {value!r}")


class _Section(_Reader):
    """A nested object of a config; errors name it as ``parent.key``."""

    def __init__(self, parent: _Reader, name: str, config: Config) -> None:
        super().__init__(parent.path, config)
        self.prefix = parent.label(name)

    def label(self, key: str) -> str:
        return f"{self.prefix}.{key}"


def _short(value: Any) -> str:
    """``repr(value)`` cut to a readable length (a config can hold anything, 10**400 included)."""
    if isinstance(value, int) and abs(value) >= 10**30:
        return f"an integer of {value.bit_length()} bits"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# --- one reader per family: each returns the MoESpec fields its layout defines, with their origins ---


def _routed(cfg: _Reader, width: tuple[str, ...], experts: tuple[str, ...], top_k: tuple[str, ...]) -> Fields:
    """H, F, E, k and the activation, under the family's keys (first present of each tuple)."""
    return {
        "hidden_size": cfg.integer("hidden_size"),
        "intermediate_size": cfg.integer(*width),
        "num_experts": cfg.expert_count(*experts),
        "top_k": cfg.integer(*top_k),
        "activation": cfg.activation(),
    }


MIXTRAL_KEYS = (("intermediate_size",), ("num_local_experts", "num_experts"), ("num_experts_per_tok",))


def _mixtral(cfg: _Reader) -> Fields:
    """Mixtral (and MiniMax, whose block is Mixtral's): softmax over all experts, then renormalise."""
    return {
        **_routed(cfg, *MIXTRAL_KEYS),
        "renormalize": fixed(True, "renormalised over the top-k (Mixtral)"),
    }


def _qwen(cfg: _Reader, norm_default: bool | None, shared: bool) -> Fields:
    """Qwen-MoE: ``norm_topk_prob`` (or always, ``norm_default=None``), an optional sigmoid-gated
    shared expert of its own width."""
    fields = _routed(
        cfg, ("moe_intermediate_size",), ("num_experts", "num_local_experts"), ("num_experts_per_tok",)
    )
    if norm_default is None:
        fields["renormalize"] = fixed(True, "always renormalised (this family has no norm_topk_prob)")
    else:
        fields["renormalize"] = cfg.flag("norm_topk_prob", default=norm_default)
    if shared:
        width = cfg.integer("shared_expert_intermediate_size", minimum=0)
        has = width.value > 0
        fields["num_shared_experts"] = fixed(int(has), f"{width.origin} > 0: one shared expert")
        fields["shared_intermediate_size"] = width
        fields["shared_expert_gate"] = fixed(has, "scaled by sigmoid(shared_expert_gate(x)) (Qwen2-MoE)")
    return fields


def _olmoe(cfg: _Reader) -> Fields:
    """OLMoE and FlexOlmo: Mixtral-like keys, ``num_experts`` and an explicit ``norm_topk_prob``."""
    fields = _routed(
        cfg, ("intermediate_size",), ("num_experts", "num_local_experts"), ("num_experts_per_tok",)
    )
    return {**fields, "renormalize": cfg.flag("norm_topk_prob", default=False)}


def _phimoe(cfg: _Reader) -> Fields:
    """PhiMoE: the sparsemixer router, always top-2, with router_jitter_noise as its eps."""
    fields = _routed(cfg, ("intermediate_size",), ("num_local_experts",), ("num_experts_per_tok",))
    return {
        **fields,
        "top_k": fixed(2, "2: the sparsemixer router is top-2 (num_experts_per_tok is ignored)"),
        "router_scoring": fixed("sparsemixer", "PhiMoE's sparsemixer"),
        "sparsemixer_eps": cfg.number("router_jitter_noise", default=0.01),
        "renormalize": fixed(False, "sparsemixer weights are not renormalised"),
    }


def _shared_like_routed(cfg: _Reader, fields: Fields, *keys: str, default: int) -> None:
    """S shared experts as wide as a routed one (DeepSeek: one MLP of width S·F, the same thing)."""
    count = cfg.optional_integer(*keys, default=default)
    fields["num_shared_experts"] = count
    width = fields["intermediate_size"]
    fields["shared_intermediate_size"] = fixed(width.value if count.value else 0, f"{width.origin} (as wide)")


def _deepseek_v2(cfg: _Reader) -> Fields:
    """DeepSeek-V2: softmax, greedy or group-limited greedy (groups ranked by their best expert),
    weights times routed_scaling_factor."""
    fields = _routed(
        cfg, ("moe_intermediate_size",), ("n_routed_experts", "num_experts"), ("num_experts_per_tok",)
    )
    _shared_like_routed(cfg, fields, "n_shared_experts", default=0)
    method = cfg.choice("topk_method", "greedy", ("greedy", "group_limited_greedy"))
    fields["topk_method"] = Sourced("group_max" if method.value != "greedy" else "greedy", method.origin)
    if method.value != "greedy":
        fields["n_group"] = cfg.integer("n_group")
        fields["topk_group"] = cfg.integer("topk_group")
    fields["router_scoring"] = cfg.choice("scoring_func", "softmax", ("softmax",))
    fields["renormalize"] = cfg.flag("norm_topk_prob", default=False)
    fields["routed_scaling_factor"] = cfg.number("routed_scaling_factor", default=1.0)
    return fields


# DeepSeek-V3's noaux_tc routing and its copies: (n_group, topk_group, scaling, norm, shared) defaults.
V3_DEFAULTS = {
    "deepseek_v3": (8, 4, 2.5, True, 1),
    "kimi_k2": (1, 1, 2.827, True, 1),
    "deepseek_v32": (8, 4, 2.5, True, 1),
    "glm4_moe": (1, 1, 1.0, True, 1),
    "glm4_moe_lite": (1, 1, 1.8, True, 1),
    "glm4v_moe_text": (1, 1, 1.0, True, 1),
    "dots1": (1, 1, 1.0, False, 0),
    "kimi_linear": (1, 1, 2.446, True, 1),
    "bailing_hybrid": (8, 4, 2.5, True, 1),
}


def _deepseek_v3(family: str) -> Callable[[_Reader], Fields]:
    """DeepSeek-V3 and the families that copy its router: sigmoid scores plus a correction bias for
    the choice, groups ranked by the sum of their two best, weights normalised then scaled."""
    n_group, topk_group, scaling, norm, shared = V3_DEFAULTS[family]

    def read(cfg: _Reader) -> Fields:
        fields = _routed(
            cfg,
            ("moe_intermediate_size",),
            ("n_routed_experts", "num_experts", "num_local_experts"),
            ("num_experts_per_tok", "num_experts_per_token"),
        )
        _shared_like_routed(cfg, fields, "n_shared_experts", "num_shared_experts", default=shared)
        return {
            **fields,
            "router_scoring": fixed("sigmoid", "sigmoid (DeepSeek-V3 routing)"),
            "topk_method": fixed("group_top2_sum", "noaux_tc: groups ranked by their two best (DeepSeek-V3)"),
            "selection_bias": fixed(True, "e_score_correction_bias, for the choice only (DeepSeek-V3)"),
            "n_group": cfg.optional_integer("n_group", "num_expert_group", default=n_group, minimum=1),
            "topk_group": cfg.optional_integer("topk_group", default=topk_group, minimum=1),
            "renormalize": cfg.flag("norm_topk_prob", "moe_renormalize", default=norm),
            "routed_scaling_factor": cfg.number("routed_scaling_factor", default=scaling),
        }

    return read


def _dbrx(cfg: _Reader) -> Fields:
    """DBRX: shape split between top-level ``d_model`` and the nested ``ffn_config``; GLU experts;
    the top-k weights divided by their p-norm, p = moe_normalize_expert_weights (null: not at all)."""
    ffn = cfg.section("ffn_config")
    act = ffn.config.get("ffn_act_fn") or {}
    if not isinstance(act, dict):
        raise cfg.fail(f"key 'ffn_config.ffn_act_fn' must be an object, got {_short(act)}")
    p = ffn.config.get("moe_normalize_expert_weights", 1)
    fields = {
        "hidden_size": cfg.integer("d_model", "hidden_size"),
        "intermediate_size": ffn.integer("ffn_hidden_size"),
        "num_experts": ffn.expert_count("moe_num_experts"),
        "top_k": ffn.integer("moe_top_k"),
        "activation": _Section(ffn, "ffn_act_fn", act).activation("name"),
        "renormalize": fixed(p is not None, f"{ffn.label('moe_normalize_expert_weights')} (null: off)"),
    }
    if p is not None:
        fields["norm_p"] = ffn.number("moe_normalize_expert_weights", default=1.0)
    return fields


def _gpt_oss(cfg: _Reader) -> Fields:
    """gpt-oss: biased router, softmax over the top-k logits, biased experts with the clamped SwiGLU."""
    fields = _routed(
        cfg,
        ("intermediate_size",),
        ("num_local_experts", "num_experts"),
        ("num_experts_per_tok", "experts_per_token"),
    )
    return {
        **fields,
        "activation": fixed("swiglu_oai", "gpt-oss' clamped SwiGLU (hidden_act is unused)"),
        "swiglu_alpha": cfg.number("swiglu_alpha", default=1.702),
        "swiglu_limit": cfg.number("swiglu_limit", default=7.0),
        "router_bias": fixed(True, "the router has a bias (gpt-oss)"),
        "router_scoring": fixed("softmax_topk", "softmax over the top-k logits (gpt-oss)"),
        "renormalize": fixed(False, "softmax over the top-k sums to 1 already"),
        "expert_bias": fixed(True, "gate_up_proj_bias and down_proj_bias (gpt-oss)"),
    }


def _llama4(cfg: _Reader) -> Fields:
    """Llama 4 text: sigmoid of the top-k logits scales each expert's input; a shared expert as wide."""
    fields = _routed(cfg, ("intermediate_size",), ("num_local_experts",), ("num_experts_per_tok",))
    width = fields["intermediate_size"]
    return {
        **fields,
        "router_scoring": fixed("sigmoid", "sigmoid of the top-k logits (Llama 4)"),
        "renormalize": fixed(False, "not renormalised (Llama 4)"),
        "weights_on_input": fixed(True, "the routing weight scales the expert's input (Llama 4)"),
        "num_shared_experts": fixed(1, "one shared expert, always on (Llama 4)"),
        "shared_intermediate_size": fixed(width.value, f"{width.origin} (as wide)"),
    }


def _granite(shared_default: int | None) -> Callable[[_Reader], Fields]:
    """GraniteMoe (+Shared, +Hybrid): softmax over the top-k logits; a plain shared MLP of
    shared_intermediate_size (Shared: when set; Hybrid: always, default 1024)."""

    def read(cfg: _Reader) -> Fields:
        fields = _routed(cfg, ("intermediate_size",), ("num_local_experts",), ("num_experts_per_tok",))
        fields["router_scoring"] = fixed("softmax_topk", "softmax over the top-k logits (GraniteMoe)")
        fields["renormalize"] = fixed(False, "softmax over the top-k sums to 1 already")
        if shared_default is not None:
            width = cfg.optional_integer("shared_intermediate_size", default=shared_default)
            fields["num_shared_experts"] = fixed(int(width.value > 0), f"{width.origin} > 0: one shared MLP")
            fields["shared_intermediate_size"] = width
        return fields

    return read


def _hunyuan(cfg: _Reader) -> Fields:
    """HunYuan-MoE: Mixtral routing (top-k may be listed per layer, then it must be one value for all),
    experts and one shared MLP all of intermediate_size."""
    top_k = cfg.config.get("moe_topk", cfg.config.get("num_experts_per_tok"))
    if isinstance(top_k, list):
        if not top_k or len(set(map(repr, top_k))) != 1:
            raise cfg.fail("moe_topk differs between layers; one value per model is supported")
        cfg = _Reader(cfg.path, {**cfg.config, "moe_topk": top_k[0]})
    fields = _routed(
        cfg, ("intermediate_size",), ("num_experts", "num_local_experts"), ("moe_topk", "num_experts_per_tok")
    )
    width = fields["intermediate_size"]
    return {
        **fields,
        "renormalize": fixed(True, "renormalised over the top-k (HunYuan)"),
        "num_shared_experts": fixed(1, "one shared MLP (HunYuan)"),
        "shared_intermediate_size": fixed(width.value, f"{width.origin} (as wide)"),
    }


def _ernie(cfg: _Reader) -> Fields:
    """ERNIE 4.5 MoE: softmax, a correction bias for the choice (moe_statics), renormalised; shared
    experts as wide as routed ones."""
    if cfg.config.get("use_bias"):
        raise cfg.fail("use_bias=true gives ERNIE's shared experts biases, which are not modelled")
    fields = _routed(
        cfg, ("moe_intermediate_size",), ("moe_num_experts", "num_experts"), ("moe_k", "num_experts_per_tok")
    )
    _shared_like_routed(cfg, fields, "moe_num_shared_experts", default=0)
    return {
        **fields,
        "selection_bias": fixed(True, "moe_statics.e_score_correction_bias, for the choice only (ERNIE)"),
        "renormalize": fixed(True, "renormalised over the top-k (ERNIE)"),
    }


def _jamba(cfg: _Reader) -> Fields:
    """Jamba: softmax over all experts, top-k, not renormalised."""
    fields = _routed(
        cfg, ("intermediate_size",), ("num_experts", "num_local_experts"), ("num_experts_per_tok",)
    )
    return {**fields, "renormalize": fixed(False, "not renormalised (Jamba)")}


FAMILIES: dict[str, Callable[[_Reader], Fields]] = {
    "mixtral": _mixtral,
    "minimax": _mixtral,
    "qwen2_moe": lambda cfg: _qwen(cfg, norm_default=False, shared=True),
    "qwen3_moe": lambda cfg: _qwen(cfg, norm_default=False, shared=False),
    "qwen3_next": lambda cfg: _qwen(cfg, norm_default=True, shared=True),
    "qwen3_5_moe_text": lambda cfg: _qwen(cfg, norm_default=None, shared=True),
    "qwen3_vl_moe_text": lambda cfg: _qwen(cfg, norm_default=None, shared=False),
    "qwen3_omni_moe_text": lambda cfg: _qwen(cfg, norm_default=True, shared=False),
    "olmoe": _olmoe,
    "flex_olmo": _olmoe,
    "phimoe": _phimoe,
    "deepseek_v2": _deepseek_v2,
    **{family: _deepseek_v3(family) for family in V3_DEFAULTS},
    "dbrx": _dbrx,
    "gpt_oss": _gpt_oss,
    "llama4_text": _llama4,
    "granitemoe": _granite(None),
    "granitemoeshared": _granite(0),
    "granitemoehybrid": _granite(1024),
    "hunyuan_v1_moe": _hunyuan,
    "ernie4_5_moe": _ernie,
    "jamba": _jamba,
}
ARCHITECTURES = {
    "MixtralForCausalLM": "mixtral",
    "MiniMaxForCausalLM": "minimax",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "Qwen3NextForCausalLM": "qwen3_next",
    "DeepseekV2ForCausalLM": "deepseek_v2",
    "DeepseekV3ForCausalLM": "deepseek_v3",
    "Glm4MoeForCausalLM": "glm4_moe",
    "Dots1ForCausalLM": "dots1",
    "DbrxForCausalLM": "dbrx",
    "OlmoeForCausalLM": "olmoe",
    "FlexOlmoForCausalLM": "flex_olmo",
    "PhimoeForCausalLM": "phimoe",
    "GptOssForCausalLM": "gpt_oss",
    "GraniteMoeForCausalLM": "granitemoe",
    "GraniteMoeSharedForCausalLM": "granitemoeshared",
    "GraniteMoeHybridForCausalLM": "granitemoehybrid",
    "HunYuanMoEV1ForCausalLM": "hunyuan_v1_moe",
    "Ernie4_5_MoeForCausalLM": "ernie4_5_moe",
    "JambaForCausalLM": "jamba",
    "KimiLinearForCausalLM": "kimi_linear",
}
# The nested text part's own model_type, when the composite's file does not spell it.
TEXT_TYPES = {
    "qwen3_vl_moe": "qwen3_vl_moe_text",
    "qwen3_omni_moe": "qwen3_omni_moe_text",
    "qwen3_omni_moe_thinker": "qwen3_omni_moe_text",
    "glm4v_moe": "glm4v_moe_text",
    "llama4": "llama4_text",
    "qwen3_5_moe": "qwen3_5_moe_text",
}


# --- quantization_config: what the checkpoint stores, said in one line ---------------------------


def _checkpoint_format(config: Config) -> Sourced:
    """A description of ``quantization_config`` ("" when absent): fp8 blocks, mxfp4, int4 groups..."""
    quant = config.get("quantization_config")
    if not isinstance(quant, dict):
        return Sourced("", "no quantization_config")
    method = str(quant.get("quant_method", "unknown"))
    block = quant.get("weight_block_size")
    if method == "fp8":
        text = (
            f"fp8 (e4m3 weights with {block[0]}×{block[1]} block scales)"
            if isinstance(block, list) and len(block) == 2
            else "fp8 (e4m3 weights with per-tensor scales)"
        )
    elif method == "mxfp4":
        text = "mxfp4 (e2m1 with e8m0 scales per 32 values)"
    else:
        details = [
            f"{quant[k]} {k}" for k in ("bits", "group_size") if isinstance(quant.get(k), (int, float))
        ]
        text = method + (f" ({', '.join(details)})" if details else "")
    return Sourced(text, "quantization_config")


def _weight_format(config: Config) -> Sourced:
    """The weight format of ``quant/formats.py`` that profiles the checkpoint's own format, or
    ``none`` when there is no quantization_config or no such format (the report then says so)."""
    quant = config.get("quantization_config")
    if not isinstance(quant, dict):
        return Sourced("none", "no quantization_config")
    method = str(quant.get("quant_method", "")).lower()
    origin = f"quantization_config (quant_method {method or '?'})"
    bits, group = quant.get("bits"), quant.get("group_size")
    if method == "fp8":
        block = quant.get("weight_block_size")
        if block is None:
            return Sourced("fp8-tensor", origin)
        if block == [128, 128]:
            return Sourced("fp8-block", origin + ", weight_block_size [128, 128]")
    elif method == "mxfp4":
        return Sourced("mxfp4", origin)
    elif method in ("gptq", "awq") and type(bits) is int and type(group) is int:
        zero_points = bool(quant.get("zero_point", True)) if method == "awq" else not quant.get("sym", True)
        if bits == 4 and group > 0 and group % 2 == 0:
            return Sourced(
                f"int4-g{group}" + ("-zp" if zero_points else ""), origin + f", bits 4, group_size {group}"
            )
        if bits == 8 and group == -1 and not zero_points:
            return Sourced("int8", origin + ", bits 8, per channel")
    return Sourced("none", origin + ": no weight format profiles it")


# --- reading the file and putting it together --------------------------------------------------


def _config_file(path: str | Path) -> Path:
    """``path`` itself, or ``path/config.json`` when given a model folder."""
    path = Path(path).expanduser()
    return path / "config.json" if path.is_dir() else path


def _load_json(path: Path) -> Config:
    try:
        if path.stat().st_size > MAX_SMALL_FILE_BYTES:
            raise UserError(f"{path}: {path.stat().st_size} bytes is too big for a config.json")
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read file ({type(exc).__name__}: {exc})") from None
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise UserError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _mentions_experts(config: Config) -> bool:
    """Whether a config, or one nested in it, declares more than one expert."""
    nested = any(_mentions_experts(v) for v in config.values() if isinstance(v, dict))
    counts = (config.get(key) for key in EXPERT_COUNT_KEYS)
    return nested or any(type(n) is int and n > 1 for n in counts)


def _family(cfg: _Reader) -> tuple[str, _Reader]:
    """(the family, the reader of the part that holds its MoE layer): by ``model_type``, else by
    ``architectures``; a composite's nested text part; else a clear refusal."""
    model_type = cfg.config.get("model_type")
    if isinstance(model_type, str) and model_type in NESTED:
        part: _Reader = cfg
        for key in NESTED[model_type]:
            part = part.section(key)
        nested_type = part.config.get("model_type")
        return (nested_type if nested_type in FAMILIES else TEXT_TYPES[model_type]), part
    if isinstance(model_type, str) and model_type in REFUSED:
        raise cfg.fail(f"model_type {model_type!r} is not supported yet: {REFUSED[model_type]}")
    if isinstance(model_type, str) and model_type in FAMILIES:
        return model_type, cfg
    architectures = cfg.config.get("architectures")
    if isinstance(architectures, list):
        for arch in architectures:
            if isinstance(arch, str) and arch in ARCHITECTURES:
                return ARCHITECTURES[arch], cfg
    shown = repr(model_type) if model_type is not None else f"none (architectures={_short(architectures)})"
    if not _mentions_experts(cfg.config):
        raise cfg.fail(f"model_type {shown} is a dense (non-MoE) model; only MoE configs are supported")
    supported = ", ".join(sorted({*FAMILIES, *NESTED} - set(TEXT_TYPES.values())))
    raise cfg.fail(f"unsupported model_type {shown}; supported: {supported}")


def _dtype(cfg: _Reader, requested: str | None) -> Sourced:
    """The requested dtype, else the config's own when it is one we run, else bfloat16."""
    if requested is not None:
        try:
            return Sourced(canonical_dtype(requested), "--dtype")
        except UserError as exc:
            raise cfg.fail(str(exc)) from None
    for key in ("torch_dtype", "dtype"):
        value = cfg.config.get(key)
        if value in CONFIG_DTYPES:
            return Sourced(value, key)
    found = cfg.config.get("torch_dtype", cfg.config.get("dtype"))
    why = f" (the config's {_short(found)} is not run)" if found else ""
    return Sourced("bfloat16", "default bfloat16" + why)


def _name(cfg: _Reader) -> Sourced:
    """``_name_or_path`` when the config records one, else the folder holding the file."""
    recorded = cfg.config.get("_name_or_path")
    if isinstance(recorded, str) and recorded.strip():
        return Sourced(" ".join(recorded.split()), "_name_or_path")
    return Sourced(cfg.path.resolve().parent.name or cfg.path.stem, "the folder's name")


def read_hf_config(path: str | Path, dtype: str | None = None) -> tuple[MoESpec, dict[str, str]]:
    """The MoE layer described by a local Hugging Face ``config.json`` (or a folder holding one),
    and for every MoESpec field where it came from: a key of the file, a default, or ``--dtype``.

    ``dtype`` overrides the weight/activation dtype; otherwise the config's ``torch_dtype`` is used
    when it is bfloat16, float16 or float32, and bfloat16 when it is anything else or absent.
    Raises UserError, naming the file, for anything unreadable, unsupported, dense or malformed.
    """
    file = _config_file(path)
    cfg = _Reader(file, _load_json(file))
    family, part = _family(cfg)
    dtype_source = part if (part.has("torch_dtype") or part.has("dtype")) else cfg
    chosen = _dtype(dtype_source, dtype)
    fields: Fields = {
        "name": _name(cfg),
        **FAMILIES[family](part),
        "weight_dtype": chosen,
        "act_dtype": chosen,
        "source": Sourced(f"{file} (model_type {family})", "this file"),
        "checkpoint_format": _checkpoint_format(cfg.config),
        "weight_format": _weight_format(cfg.config),
    }
    try:
        spec = MoESpec(**{name: sourced.value for name, sourced in fields.items()})
    except UserError as exc:
        raise cfg.fail(str(exc)) from None
    origins = {
        f.name: fields[f.name].origin if f.name in fields else "default" for f in dataclasses.fields(spec)
    }
    return spec, origins


def spec_from_hf_config(path: str | Path, dtype: str | None = None) -> MoESpec:
    """``read_hf_config`` without the origins."""
    return read_hf_config(path, dtype)[0]
