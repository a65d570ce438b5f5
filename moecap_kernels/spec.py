"""MoESpec: the shape, dtypes and semantics of one MoE layer, and the presets shipped as JSON data.

Vocabulary (see README): H = hidden_size, F = intermediate_size (per routed expert),
E = num_experts, k = top_k, S = num_shared_experts, F_s = shared_intermediate_size.

Semantics, each a field with the plain Mixtral behaviour as its default:

- router: ``router_bias`` (logits = x·W_rᵀ + b_r); ``router_scoring`` softmax (over all experts),
  sigmoid, softmax_topk (softmax over the k largest logits only) or sparsemixer (PhiMoE's top-2:
  each pick's weight a softmax over the experts within a relative ``2·sparsemixer_eps`` of it);
- selection: ``topk_method`` greedy, group_max (DeepSeek-V2's group-limited greedy: groups ranked
  by their best score) or group_top2_sum (DeepSeek-V3's: ranked by the sum of their two best),
  keeping ``topk_group`` of ``n_group`` groups; ``selection_bias`` (a per-expert bias added to the
  scores for choosing only; the weights are the unbiased scores);
- weights: ``renormalize`` (divided by their ``norm_p``-norm: p = 1 is the sum), then multiplied by
  ``routed_scaling_factor``; ``weights_on_input`` scales an expert's input instead of its output
  (Llama 4);
- experts: ``expert_bias`` (gate/up and down projections with biases); ``activation`` silu, gelu
  (erf), gelu_tanh, or swiglu_oai (gpt-oss: gate clamped to ``swiglu_limit`` from above, up to
  ±limit, ``(up + 1) · gate · σ(swiglu_alpha · gate)``);
- shared experts: ``shared_expert_gate`` (each scaled by σ(x·w_g), one gate vector per shared
  expert, Qwen2-MoE);
- ``checkpoint_format``: how the checkpoint stores its experts when that is not ``weight_dtype``
  (a quantization_config), said in the report; empty when it is;
- ``weight_format``: the format the experts are profiled in (``quant/formats.py``: ``none``, ``int8``,
  ``w8a8``, ``int4-gN[-zp]``, ``fp8-tensor``/``-channel``/``-block``, ``mxfp4``); the router, the
  biases and the shared-expert gates stay in ``weight_dtype``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

from moecap_kernels.dtypes import canonical_dtype, dtype_bytes
from moecap_kernels.errors import UserError
from moecap_kernels.limits import MAX_DIMENSION, MAX_EXPERTS, MAX_SHARED_EXPERTS
from moecap_kernels.quant.formats import WeightFormat, weight_format

ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "swiglu_oai")
SCORINGS = ("softmax", "sigmoid", "softmax_topk", "sparsemixer")
TOPK_METHODS = ("greedy", "group_max", "group_top2_sum")
SELECTION_BIAS_BYTES = 4  # the correction bias is kept in float32 (as the checkpoints store it)


@dataclass(frozen=True)
class MoESpec:
    """One MoE layer: router → top-k routed experts (+ always-active shared experts) → combine."""

    name: str
    hidden_size: int
    intermediate_size: int
    num_experts: int
    top_k: int
    num_shared_experts: int = 0
    shared_intermediate_size: int = 0
    gated: bool = True
    activation: str = "silu"
    router_scoring: str = "softmax"
    renormalize: bool = True
    weight_dtype: str = "bfloat16"
    act_dtype: str = "bfloat16"
    source: str = ""
    router_bias: bool = False
    topk_method: str = "greedy"
    n_group: int = 1
    topk_group: int = 1
    selection_bias: bool = False
    norm_p: float = 1.0
    routed_scaling_factor: float = 1.0
    sparsemixer_eps: float = 0.01
    weights_on_input: bool = False
    expert_bias: bool = False
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    shared_expert_gate: bool = False
    checkpoint_format: str = ""
    weight_format: str = "none"

    def __post_init__(self) -> None:
        for field, low, high in (
            ("hidden_size", 1, MAX_DIMENSION),
            ("intermediate_size", 1, MAX_DIMENSION),
            ("num_experts", 1, MAX_EXPERTS),
            ("top_k", 1, MAX_EXPERTS),
            ("num_shared_experts", 0, MAX_SHARED_EXPERTS),
            ("shared_intermediate_size", 0, MAX_DIMENSION),
        ):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int):
                raise UserError(f"{self.name}: {field} must be an integer, got {type(value).__name__}")
            if not low <= value <= high:
                shown = value if abs(value) < 10**12 else f"an integer of {value.bit_length()} bits"
                raise UserError(f"{self.name}: {field} must be from {low} to {high}, got {shown}")
        if self.top_k > self.num_experts:
            raise UserError(f"{self.name}: top_k={self.top_k} exceeds num_experts={self.num_experts}")
        if self.num_shared_experts and not self.shared_intermediate_size:
            raise UserError(f"{self.name}: shared experts need shared_intermediate_size > 0")
        for field, allowed in (
            ("activation", ACTIVATIONS),
            ("router_scoring", SCORINGS),
            ("topk_method", TOPK_METHODS),
        ):
            if getattr(self, field) not in allowed:
                raise UserError(
                    f"{self.name}: {field} must be one of {allowed}, got {getattr(self, field)!r}"
                )
        self._check_semantics()
        object.__setattr__(self, "weight_dtype", canonical_dtype(self.weight_dtype))
        object.__setattr__(self, "act_dtype", canonical_dtype(self.act_dtype))
        if not isinstance(self.weight_format, str):
            raise UserError(f"{self.name}: weight_format must be a string, got {self.weight_format!r}")
        fmt = weight_format(self.weight_format)
        object.__setattr__(self, "weight_format", fmt.name)
        for rows, cols, projection, what in self.matrix_shapes():
            fmt.check_shape(rows, cols, projection, f"{self.name}'s {what}")

    def _check_semantics(self) -> None:
        """Combinations no model has, or that would make the layer undefined."""
        for field, low, high in (("n_group", 1, self.num_experts), ("topk_group", 1, self.n_group)):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise UserError(
                    f"{self.name}: {field} must be an integer from {low} to {high}, got {value!r}"
                )
        for field in ("norm_p", "routed_scaling_factor", "sparsemixer_eps", "swiglu_alpha", "swiglu_limit"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1e6:
                raise UserError(f"{self.name}: {field} must be a positive number, got {value!r}")
        if self.topk_method != "greedy":
            per_group, remainder = divmod(self.num_experts, self.n_group)
            if remainder or (self.topk_method == "group_top2_sum" and per_group < 2):
                raise UserError(
                    f"{self.name}: {self.topk_method} needs num_experts ({self.num_experts}) split evenly "
                    f"into n_group={self.n_group} groups" + (" of at least 2" if per_group < 2 else "")
                )
            if self.top_k > self.topk_group * per_group:
                raise UserError(f"{self.name}: top_k={self.top_k} exceeds the {self.topk_group} groups kept")
        if self.router_scoring == "sparsemixer" and self.top_k != 2:
            raise UserError(f"{self.name}: the sparsemixer router picks exactly 2 experts, not {self.top_k}")
        if self.activation == "swiglu_oai" and not self.gated:
            raise UserError(f"{self.name}: swiglu_oai needs gated experts")
        if self.shared_expert_gate and not self.num_shared_experts:
            raise UserError(f"{self.name}: shared_expert_gate needs shared experts")

    # --- sizes, all exact Python ints -------------------------------------------------
    @property
    def matrices_per_expert(self) -> int:
        """3 for a gated expert (gate, up, down), 2 otherwise (up, down)."""
        return 3 if self.gated else 2

    @property
    def expert_in_rows(self) -> int:
        """Rows of an expert's input projection: gate and up stacked when gated."""
        return (2 if self.gated else 1) * self.intermediate_size

    @property
    def params_per_expert(self) -> int:
        """P_e = 3·H·F (gated) or 2·H·F."""
        return self.matrices_per_expert * self.hidden_size * self.intermediate_size

    @property
    def params_per_shared_expert(self) -> int:
        return self.matrices_per_expert * self.hidden_size * self.shared_intermediate_size

    @property
    def weight_bytes_per_param(self) -> int:
        return dtype_bytes(self.weight_dtype)

    @property
    def act_bytes_per_element(self) -> int:
        return dtype_bytes(self.act_dtype)

    @property
    def bias_params_per_expert(self) -> int:
        """The biases of one routed expert's input and output projections (F_in + H), or 0."""
        return self.expert_in_rows + self.hidden_size if self.expert_bias else 0

    @property
    def fmt(self) -> WeightFormat:
        """The experts' weight format."""
        return weight_format(self.weight_format)

    def matrix_shapes(self) -> tuple[tuple[int, int, int, str], ...]:
        """(rows, reduction length, rows per projection, name) of the expert matrices a format stores."""
        h, f, fs = self.hidden_size, self.intermediate_size, self.shared_intermediate_size
        shapes = [(self.expert_in_rows, h, f, "expert input projection"), (h, f, h, "expert down projection")]
        if self.num_shared_experts:
            rows = (2 if self.gated else 1) * fs
            shapes += [(rows, h, fs, "shared input projection"), (h, fs, h, "shared down projection")]
        return tuple(shapes)

    def _expert_matrix_bytes(self, intermediate: int) -> int:
        """An expert's input and down matrices in the weight format (codes, scales, zero points)."""
        h, b_w, fmt = self.hidden_size, self.weight_bytes_per_param, self.fmt
        rows = (2 if self.gated else 1) * intermediate
        return fmt.matrix_bytes(rows, h, intermediate, b_w) + fmt.matrix_bytes(h, intermediate, h, b_w)

    @property
    def expert_weight_bytes(self) -> int:
        """Bytes of one routed expert: its matrices in the weight format, plus its biases · b_w
        (unquantized: (P_e + biases) · b_w)."""
        biases = self.bias_params_per_expert * self.weight_bytes_per_param
        return self._expert_matrix_bytes(self.intermediate_size) + biases

    def expert_bytes_by_part(self) -> dict[str, int]:
        """One routed expert's bytes by what they hold: codes (the weights themselves when
        unquantized), scales, zero points, biases; they sum to ``expert_weight_bytes``."""
        h, f, fmt, b_w = self.hidden_size, self.intermediate_size, self.fmt, self.weight_bytes_per_param
        matrices = ((self.expert_in_rows, h, f), (h, f, h))
        if not fmt.quantized:
            codes, scales, zeros = self.params_per_expert * b_w, 0, 0
        else:
            codes = sum(fmt.code_bytes(r, k) for r, k, _ in matrices)
            scales = sum(fmt.scale_count(r, k, p) for r, k, p in matrices) * fmt.scale_bytes_each
            zeros = sum(fmt.zero_point_bytes(r, k) for r, k, _ in matrices)
        biases = self.bias_params_per_expert * b_w
        return {"codes": codes, "scales": scales, "zero_points": zeros, "biases": biases}

    @property
    def compute_dtype(self) -> str:
        """The dtype the expert GEMMs run in, whose peak divides S-MFU: int8 for ``w8a8``, else the
        activations' (weight-only formats dequantize into it)."""
        return self.fmt.compute_dtype or self.act_dtype

    @property
    def shared_expert_weight_bytes(self) -> int:
        """Bytes of one shared expert in the weight format (unquantized: P_s · b_w)."""
        return self._expert_matrix_bytes(self.shared_intermediate_size) if self.num_shared_experts else 0

    @property
    def router_params(self) -> int:
        """The router's matrix E·H, and its bias E when it has one."""
        return self.num_experts * self.hidden_size + (self.num_experts if self.router_bias else 0)

    @property
    def shared_gate_params(self) -> int:
        """S·H: one gate vector per shared expert (Qwen2-MoE), or 0."""
        return self.num_shared_experts * self.hidden_size if self.shared_expert_gate else 0

    @property
    def selection_bias_bytes(self) -> int:
        """E float32 correction biases read for the expert choice (DeepSeek-V3), or 0."""
        return self.num_experts * SELECTION_BIAS_BYTES if self.selection_bias else 0

    @property
    def total_params(self) -> int:
        """All parameters in the weight dtype: router, routed and shared experts, shared gates."""
        return (
            self.router_params
            + self.num_experts * (self.params_per_expert + self.bias_params_per_expert)
            + self.num_shared_experts * self.params_per_shared_expert
            + self.shared_gate_params
        )

    @property
    def total_weight_bytes(self) -> int:
        """Every byte of the layer's weights as profiled (experts in the weight format), the float32
        correction bias included."""
        dense = (self.router_params + self.shared_gate_params) * self.weight_bytes_per_param
        experts = self.num_experts * self.expert_weight_bytes
        shared = self.num_shared_experts * self.shared_expert_weight_bytes
        return dense + experts + shared + self.selection_bias_bytes

    @property
    def unquantized_weight_bytes(self) -> int:
        """The same layer's bytes with every weight in ``weight_dtype`` (what it is quantized from)."""
        return self.total_params * self.weight_bytes_per_param + self.selection_bias_bytes

    def with_format(self, name: str) -> MoESpec:
        """The same layer with its experts in weight format ``name``."""
        return dataclasses.replace(self, weight_format=name)

    def with_dtype(self, dtype: str) -> MoESpec:
        """The same layer with weights and activations in ``dtype``."""
        dtype = canonical_dtype(dtype)
        return dataclasses.replace(self, weight_dtype=dtype, act_dtype=dtype)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], origin: str) -> MoESpec:
        """Build from a preset-style dict; unknown or missing keys are a UserError naming ``origin``."""
        if not isinstance(data, dict):
            raise UserError(f"{origin}: expected a JSON object")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise UserError(f"{origin}: unknown keys {unknown}")
        try:
            return cls(**data)
        except TypeError as exc:
            raise UserError(f"{origin}: {exc}") from None


@cache
def _preset_files() -> dict[str, Any]:
    folder = resources.files("moecap_kernels") / "presets"
    return {p.name.removesuffix(".json"): p for p in folder.iterdir() if p.name.endswith(".json")}


def list_presets() -> list[str]:
    """Names of the shipped presets, sorted."""
    return sorted(_preset_files())


@dataclass(frozen=True)
class ModelFacts:
    """What a preset says of its whole model, beside the one layer its spec describes: every
    parameter (``params``), its decoder layers, and how many of them are MoE layers."""

    params: int
    layers: int
    moe_layers: int
    source: str

    def expert_params(self, spec: MoESpec) -> int:
        """Parameters of every MoE layer's routed and shared experts (what a weight format stores)."""
        routed = spec.num_experts * (spec.params_per_expert + spec.bias_params_per_expert)
        return self.moe_layers * (routed + spec.num_shared_experts * spec.params_per_shared_expert)

    def weight_bytes(self, spec: MoESpec) -> int:
        """The whole model's weights with its experts in ``spec``'s weight format and every other
        parameter (attention, embeddings, norms, routers, dense layers) in ``spec.weight_dtype``."""
        experts = self.moe_layers * (
            spec.num_experts * spec.expert_weight_bytes
            + spec.num_shared_experts * spec.shared_expert_weight_bytes
        )
        return experts + (self.params - self.expert_params(spec)) * spec.weight_bytes_per_param


def _preset_data(name: str) -> tuple[str, dict[str, Any]]:
    files = _preset_files()
    key = name.strip().lower()
    if key not in files:
        raise UserError(f"unknown model {name!r}; known models: {', '.join(list_presets())}")
    try:
        return key, json.loads(files[key].read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"preset {key}: malformed JSON ({exc})") from None


def load_preset(name: str) -> MoESpec:
    """The shipped preset ``name`` (case-insensitive), or UserError listing what exists."""
    key, data = _preset_data(name)
    data.pop("model", None)  # the whole model's facts: ``load_model_facts``
    return MoESpec.from_dict(data, origin=f"preset {key}")


def load_model_facts(name: str) -> ModelFacts:
    """The whole-model facts of preset ``name``; UserError when it has none."""
    key, data = _preset_data(name)
    if "model" not in data:
        raise UserError(f"preset {key} does not state its whole model's parameters")
    return ModelFacts(**data["model"])
