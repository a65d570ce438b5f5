"""Build a MoESpec from a local Hugging Face ``config.json`` (no network access).

Each supported family stores the MoE shape under different keys (Mixtral's ``num_local_experts``,
DeepSeek's ``n_routed_experts``, DBRX's nested ``ffn_config``...). One small reader per family maps
its layout onto the package vocabulary (H, F, E, k, S, F_s). Every failure is a one-line UserError
that names the file, so a bad config never surfaces as a KeyError or a traceback.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from moecap_kernels.dtypes import canonical_dtype
from moecap_kernels.errors import UserError
from moecap_kernels.spec import MoESpec

Config = dict[str, Any]

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

    def integer(self, key: str, minimum: int = 1) -> int:
        """A required integer key, at least ``minimum``."""
        value = self._lookup(key)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(f"key {self.label(key)!r} must be an integer, got {value!r}")
        if value < minimum:
            raise self.fail(f"key {self.label(key)!r} must be >= {minimum}, got {value}")
        return value

    def first_integer(self, *keys: str) -> int:
        """The first of ``keys`` present (families renamed some keys across releases)."""
        for key in keys:
            if key in self.config:
                return self.integer(key)
        raise self.fail(f"missing key {self.label(keys[0])!r}")

    def optional_integer(self, key: str) -> int:
        """A non-negative integer that may be absent or null (meaning 0)."""
        if self.config.get(key) is None:
            return 0
        return self.integer(key, minimum=0)

    def expert_count(self, key: str) -> int:
        """The routed-expert count; null, 0 or 1 means the config describes a dense model."""
        value = self._lookup(key)
        if value is None or (type(value) is int and value in (0, 1)):
            raise self.fail(f"describes a dense (non-MoE) model: {self.label(key)}={value!r}")
        return self.integer(key)

    def flag(self, key: str, default: bool) -> bool:
        value = self.config.get(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self.fail(f"key {self.label(key)!r} must be true or false, got {value!r}")
        return value

    def choice(self, key: str, default: str, allowed: tuple[str, ...]) -> str:
        value = self.config.get(key)
        if value is None:
            return default
        if value not in allowed:
            raise self.fail(f"key {self.label(key)!r} must be one of {allowed}, got {value!r}")
        return value

    def activation(self, key: str = "hidden_act", default: str = "silu") -> str:
        value = self.config.get(key)
        if value is None:
            return default
        if not isinstance(value, str) or value.lower() not in ACTIVATION_NAMES:
            raise self.fail(f"unsupported activation {self.label(key)}={value!r}; expected silu or gelu")
        return ACTIVATION_NAMES[value.lower()]


class _Section(_Reader):
    """A nested object of a config; errors name it as ``parent.key``."""

    def __init__(self, parent: _Reader, name: str, config: Config) -> None:
        super().__init__(parent.path, config)
        self.prefix = parent.label(name)

    def label(self, key: str) -> str:
        return f"{self.prefix}.{key}"


# --- one reader per family: each returns the MoESpec fields its layout defines -------------------


def _mixtral(cfg: _Reader) -> Config:
    """Mixtral: softmax over all experts, then renormalise over the selected top-k."""
    return {
        "hidden_size": cfg.integer("hidden_size"),
        "intermediate_size": cfg.integer("intermediate_size"),
        "num_experts": cfg.expert_count("num_local_experts"),
        "top_k": cfg.integer("num_experts_per_tok"),
        "activation": cfg.activation(),
        "renormalize": True,
    }


def _qwen_moe(cfg: _Reader, shared: bool) -> Config:
    """Qwen1.5/Qwen2 MoE (one shared expert of its own width) and Qwen3 MoE (none)."""
    fields = {
        "hidden_size": cfg.integer("hidden_size"),
        "intermediate_size": cfg.integer("moe_intermediate_size"),
        "num_experts": cfg.expert_count("num_experts"),
        "top_k": cfg.integer("num_experts_per_tok"),
        "activation": cfg.activation(),
        "renormalize": cfg.flag("norm_topk_prob", default=False),
    }
    shared_size = cfg.integer("shared_expert_intermediate_size", minimum=0) if shared else 0
    fields["num_shared_experts"] = 1 if shared_size else 0
    fields["shared_intermediate_size"] = shared_size
    return fields


def _deepseek(cfg: _Reader, default_scoring: str, default_renormalize: bool) -> Config:
    """DeepSeek-V2/V3 (and Kimi-K2): S shared experts, each as wide as a routed one."""
    width = cfg.integer("moe_intermediate_size")
    shared = cfg.optional_integer("n_shared_experts")
    return {
        "hidden_size": cfg.integer("hidden_size"),
        "intermediate_size": width,
        "num_experts": cfg.expert_count("n_routed_experts"),
        "top_k": cfg.integer("num_experts_per_tok"),
        "num_shared_experts": shared,
        "shared_intermediate_size": width if shared else 0,
        "activation": cfg.activation(),
        "router_scoring": cfg.choice("scoring_func", default_scoring, ("softmax", "sigmoid")),
        "renormalize": cfg.flag("norm_topk_prob", default=default_renormalize),
    }


def _dbrx(cfg: _Reader) -> Config:
    """DBRX: shape split between top-level ``d_model`` and the nested ``ffn_config``; GLU experts."""
    ffn = cfg.section("ffn_config")
    act = ffn.config.get("ffn_act_fn") or {}
    if not isinstance(act, dict):
        raise cfg.fail(f"key 'ffn_config.ffn_act_fn' must be an object, got {act!r}")
    return {
        "hidden_size": cfg.integer("d_model"),
        "intermediate_size": ffn.integer("ffn_hidden_size"),
        "num_experts": ffn.expert_count("moe_num_experts"),
        "top_k": ffn.integer("moe_top_k"),
        "activation": _Section(ffn, "ffn_act_fn", act).activation("name"),
        # DBRX normalises the top-k weights unless moe_normalize_expert_weights is explicitly null.
        "renormalize": ffn.config.get("moe_normalize_expert_weights", 1) is not None,
    }


def _olmoe(cfg: _Reader) -> Config:
    """OLMoE: Mixtral-like keys but ``num_experts`` and an explicit ``norm_topk_prob``."""
    return {
        "hidden_size": cfg.integer("hidden_size"),
        "intermediate_size": cfg.integer("intermediate_size"),
        "num_experts": cfg.expert_count("num_experts"),
        "top_k": cfg.integer("num_experts_per_tok"),
        "activation": cfg.activation(),
        "renormalize": cfg.flag("norm_topk_prob", default=False),
    }


def _gpt_oss(cfg: _Reader) -> Config:
    """gpt-oss, modelled as a gated silu expert without biases (the real one is a clamped SwiGLU)."""
    experts_key = "num_local_experts" if "num_local_experts" in cfg.config else "num_experts"
    return {
        "hidden_size": cfg.integer("hidden_size"),
        "intermediate_size": cfg.integer("intermediate_size"),
        "num_experts": cfg.expert_count(experts_key),
        "top_k": cfg.first_integer("num_experts_per_tok", "experts_per_token"),
        "activation": "silu",
        "renormalize": True,
    }


FAMILIES: dict[str, Callable[[_Reader], Config]] = {
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


def _dtype(cfg: _Reader, requested: str | None) -> str:
    """The requested dtype, else the config's own when it is one we run, else bfloat16."""
    if requested is not None:
        try:
            return canonical_dtype(requested)
        except UserError as exc:
            raise cfg.fail(str(exc)) from None
    for key in ("torch_dtype", "dtype"):
        value = cfg.config.get(key)
        if value in CONFIG_DTYPES:
            return value
    return "bfloat16"


def _name(cfg: _Reader) -> str:
    """``_name_or_path`` when the config records one, else the folder holding the file."""
    recorded = cfg.config.get("_name_or_path")
    if isinstance(recorded, str) and recorded.strip():
        return " ".join(recorded.split())
    return cfg.path.resolve().parent.name or cfg.path.stem


def spec_from_hf_config(path: str | Path, dtype: str | None = None) -> MoESpec:
    """The MoE layer described by a local Hugging Face ``config.json`` (or a folder holding one).

    ``dtype`` overrides the weight/activation dtype; otherwise the config's ``torch_dtype`` is used
    when it is bfloat16, float16 or float32, and bfloat16 when it is anything else or absent.
    Raises UserError, naming the file, for anything unreadable, unsupported, dense or malformed.
    """
    file = _config_file(path)
    cfg = _Reader(file, _load_json(file))
    family = _family(cfg)
    fields = FAMILIES[family](cfg)
    chosen = _dtype(cfg, dtype)
    try:
        return MoESpec(
            name=_name(cfg),
            weight_dtype=chosen,
            act_dtype=chosen,
            source=f"{file} (model_type {family})",
            **fields,
        )
    except UserError as exc:
        raise cfg.fail(str(exc)) from None
