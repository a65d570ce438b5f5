"""Build a MoESpec from a local Hugging Face ``config.json`` (no network access).

Each supported family stores the MoE shape under different keys (Mixtral's ``num_local_experts``,
DeepSeek's ``n_routed_experts``, DBRX's nested ``ffn_config``...). One small reader per family maps
its layout onto the package vocabulary (H, F, E, k, S, F_s), and says for every field where it came
from (the key, or the default taken when the key is absent), which ``--dry-run`` shows. Every failure
is a one-line UserError that names the file, so a bad config never surfaces as a KeyError or a
traceback.
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


class Sourced(NamedTuple):
    """A field's value and where it came from: a config key, or the default taken without one."""

    value: Any
    origin: str


def fixed(value: Any, why: str) -> Sourced:
    """A value the family's layout implies, with no key of its own."""
    return Sourced(value, why)


Fields = dict[str, Sourced]

CONFIG_DTYPES = ("bfloat16", "float16", "float32")
ACTIVATION_NAMES = {
    "silu": "silu",
    "swish": "silu",
    "gelu": "gelu",
    "gelu_new": "gelu",
    "gelu_pytorch_tanh": "gelu",
    "gelu_fast": "gelu",
}
# Keys whose presence marks a config as MoE even when its family is unknown to us.
EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


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
            raise self.fail(f"key {key!r} must be an object, got {value!r}")
        return _Section(self, key, value)

    def label(self, key: str) -> str:
        return key

    def _lookup(self, key: str) -> Any:
        if key not in self.config:
            raise self.fail(f"missing key {self.label(key)!r}")
        return self.config[key]

    def integer(self, key: str, minimum: int = 1) -> Sourced:
        """A required integer key, at least ``minimum``."""
        value = self._lookup(key)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(f"key {self.label(key)!r} must be an integer, got {_short(value)}")
        if value < minimum:
            raise self.fail(f"key {self.label(key)!r} must be >= {minimum}, got {value}")
        return Sourced(value, self.label(key))

    def first_integer(self, *keys: str) -> Sourced:
        """The first of ``keys`` present (families renamed some keys across releases)."""
        for key in keys:
            if key in self.config:
                return self.integer(key)
        raise self.fail(f"missing key {self.label(keys[0])!r}")

    def optional_integer(self, key: str) -> Sourced:
        """A non-negative integer that may be absent or null (meaning 0)."""
        if self.config.get(key) is None:
            return Sourced(0, f"{self.label(key)} (absent: 0)")
        return self.integer(key, minimum=0)

    def expert_count(self, key: str) -> Sourced:
        """The routed-expert count; null, 0 or 1 means the config describes a dense model."""
        value = self._lookup(key)
        if value is None or (type(value) is int and value in (0, 1)):
            raise self.fail(f"describes a dense (non-MoE) model: {self.label(key)}={value!r}")
        return self.integer(key)

    def flag(self, key: str, default: bool) -> Sourced:
        value = self.config.get(key)
        if value is None:
            return Sourced(default, f"{self.label(key)} (absent: {str(default).lower()})")
        if not isinstance(value, bool):
            raise self.fail(f"key {self.label(key)!r} must be true or false, got {_short(value)}")
        return Sourced(value, self.label(key))

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
            raise self.fail(
                f"unsupported activation {self.label(key)}={_short(value)}; expected silu or gelu"
            )
        return Sourced(ACTIVATION_NAMES[value.lower()], f"{self.label(key)} = {value!r}")


def _short(value: Any) -> str:
    """``repr(value)`` cut to a readable length (a config can hold anything, 10**400 included)."""
    if isinstance(value, int) and abs(value) >= 10**30:
        return f"an integer of {value.bit_length()} bits"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class _Section(_Reader):
    """A nested object of a config; errors name it as ``parent.key``."""

    def __init__(self, parent: _Reader, name: str, config: Config) -> None:
        super().__init__(parent.path, config)
        self.prefix = parent.label(name)

    def label(self, key: str) -> str:
        return f"{self.prefix}.{key}"


# --- one reader per family: each returns the MoESpec fields its layout defines, with their origins ---


def _mixtral(cfg: _Reader) -> Fields:
    """Mixtral: softmax over all experts, then renormalise over the selected top-k."""
    return {
        "hidden_size": cfg.integer("hidden_size"),
        "intermediate_size": cfg.integer("intermediate_size"),
        "num_experts": cfg.expert_count("num_local_experts"),
        "top_k": cfg.integer("num_experts_per_tok"),
        "activation": cfg.activation(),
        "renormalize": fixed(True, "Mixtral renormalises over the top-k"),
    }


def _qwen_moe(cfg: _Reader, shared: bool) -> Fields:
    """Qwen1.5/Qwen2 MoE (one shared expert of its own width) and Qwen3 MoE (none)."""
    fields = {
        "hidden_size": cfg.integer("hidden_size"),
        "intermediate_size": cfg.integer("moe_intermediate_size"),
        "num_experts": cfg.expert_count("num_experts"),
        "top_k": cfg.integer("num_experts_per_tok"),
        "activation": cfg.activation(),
        "renormalize": cfg.flag("norm_topk_prob", default=False),
    }
    if not shared:
        return fields
    width = cfg.integer("shared_expert_intermediate_size", minimum=0)
    fields["num_shared_experts"] = fixed(int(width.value > 0), f"{width.origin} > 0: one shared expert")
    fields["shared_intermediate_size"] = width
    return fields


def _deepseek(cfg: _Reader, default_scoring: str, default_renormalize: bool) -> Fields:
    """DeepSeek-V2/V3 (and Kimi-K2): S shared experts, each as wide as a routed one."""
    width = cfg.integer("moe_intermediate_size")
    shared = cfg.optional_integer("n_shared_experts")
    shared_width = width.value if shared.value else 0
    return {
        "hidden_size": cfg.integer("hidden_size"),
        "intermediate_size": width,
        "num_experts": cfg.expert_count("n_routed_experts"),
        "top_k": cfg.integer("num_experts_per_tok"),
        "num_shared_experts": shared,
        "shared_intermediate_size": fixed(shared_width, f"{width.origin} (shared experts are as wide)"),
        "activation": cfg.activation(),
        "router_scoring": cfg.choice("scoring_func", default_scoring, ("softmax", "sigmoid")),
        "renormalize": cfg.flag("norm_topk_prob", default=default_renormalize),
    }


def _dbrx(cfg: _Reader) -> Fields:
    """DBRX: shape split between top-level ``d_model`` and the nested ``ffn_config``; GLU experts."""
    ffn = cfg.section("ffn_config")
    act = ffn.config.get("ffn_act_fn") or {}
    if not isinstance(act, dict):
        raise cfg.fail(f"key 'ffn_config.ffn_act_fn' must be an object, got {_short(act)}")
    # DBRX normalises the top-k weights unless moe_normalize_expert_weights is explicitly null.
    normalise = ffn.config.get("moe_normalize_expert_weights", 1) is not None
    return {
        "hidden_size": cfg.integer("d_model"),
        "intermediate_size": ffn.integer("ffn_hidden_size"),
        "num_experts": ffn.expert_count("moe_num_experts"),
        "top_k": ffn.integer("moe_top_k"),
        "activation": _Section(ffn, "ffn_act_fn", act).activation("name"),
        "renormalize": fixed(normalise, f"{ffn.label('moe_normalize_expert_weights')} (null: off)"),
    }


def _olmoe(cfg: _Reader) -> Fields:
    """OLMoE: Mixtral-like keys but ``num_experts`` and an explicit ``norm_topk_prob``."""
    return {
        "hidden_size": cfg.integer("hidden_size"),
        "intermediate_size": cfg.integer("intermediate_size"),
        "num_experts": cfg.expert_count("num_experts"),
        "top_k": cfg.integer("num_experts_per_tok"),
        "activation": cfg.activation(),
        "renormalize": cfg.flag("norm_topk_prob", default=False),
    }


def _gpt_oss(cfg: _Reader) -> Fields:
    """gpt-oss, modelled as a gated silu expert without biases (the real one is a clamped SwiGLU)."""
    experts_key = "num_local_experts" if "num_local_experts" in cfg.config else "num_experts"
    return {
        "hidden_size": cfg.integer("hidden_size"),
        "intermediate_size": cfg.integer("intermediate_size"),
        "num_experts": cfg.expert_count(experts_key),
        "top_k": cfg.first_integer("num_experts_per_tok", "experts_per_token"),
        "activation": fixed("silu", "gpt-oss modelled as a silu-gated expert"),
        "renormalize": fixed(True, "gpt-oss renormalises over the top-k"),
    }


FAMILIES: dict[str, Callable[[_Reader], Fields]] = {
    "mixtral": _mixtral,
    "qwen2_moe": lambda cfg: _qwen_moe(cfg, shared=True),
    "qwen3_moe": lambda cfg: _qwen_moe(cfg, shared=False),
    "deepseek_v2": lambda cfg: _deepseek(cfg, default_scoring="softmax", default_renormalize=False),
    "deepseek_v3": lambda cfg: _deepseek(cfg, default_scoring="sigmoid", default_renormalize=True),
    "kimi_k2": lambda cfg: _deepseek(cfg, default_scoring="sigmoid", default_renormalize=True),
    "dbrx": _dbrx,
    "olmoe": _olmoe,
    "gpt_oss": _gpt_oss,
}
ARCHITECTURES = {
    "MixtralForCausalLM": "mixtral",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "DeepseekV2ForCausalLM": "deepseek_v2",
    "DeepseekV3ForCausalLM": "deepseek_v3",
    "DbrxForCausalLM": "dbrx",
    "OlmoeForCausalLM": "olmoe",
    "GptOssForCausalLM": "gpt_oss",
}


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
    """Whether a config, or its nested ``text_config``, declares more than one expert."""
    text = config.get("text_config")
    nested = _mentions_experts(text) if isinstance(text, dict) else False
    counts = (config.get(key) for key in EXPERT_COUNT_KEYS)
    return nested or any(type(n) is int and n > 1 for n in counts)


def _family(cfg: _Reader) -> str:
    """The family named by ``model_type``, else by ``architectures``, else a clear refusal."""
    model_type = cfg.config.get("model_type")
    if isinstance(model_type, str) and model_type in FAMILIES:
        return model_type
    architectures = cfg.config.get("architectures")
    if isinstance(architectures, list):
        for arch in architectures:
            if isinstance(arch, str) and arch in ARCHITECTURES:
                return ARCHITECTURES[arch]
    shown = repr(model_type) if model_type is not None else f"none (architectures={architectures!r})"
    if not _mentions_experts(cfg.config):
        raise cfg.fail(f"model_type {shown} is a dense (non-MoE) model; only MoE configs are supported")
    raise cfg.fail(f"unsupported model_type {shown}; supported: {', '.join(FAMILIES)}")


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
    family = _family(cfg)
    chosen = _dtype(cfg, dtype)
    fields: Fields = {
        "name": _name(cfg),
        **FAMILIES[family](cfg),
        "weight_dtype": chosen,
        "act_dtype": chosen,
        "source": Sourced(f"{file} (model_type {family})", "this file"),
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
