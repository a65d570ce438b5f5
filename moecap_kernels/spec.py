"""MoESpec: the shape and dtypes of one MoE layer, and the presets shipped as JSON data.

Vocabulary (see README): H = hidden_size, F = intermediate_size (per routed expert),
E = num_experts, k = top_k, S = num_shared_experts, F_s = shared_intermediate_size.
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

ACTIVATIONS = ("silu", "gelu")
SCORINGS = ("softmax", "sigmoid")


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
        if self.activation not in ACTIVATIONS:
            raise UserError(f"{self.name}: activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.router_scoring not in SCORINGS:
            raise UserError(
                f"{self.name}: router_scoring must be one of {SCORINGS}, got {self.router_scoring!r}"
            )
        object.__setattr__(self, "weight_dtype", canonical_dtype(self.weight_dtype))
        object.__setattr__(self, "act_dtype", canonical_dtype(self.act_dtype))

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
    def expert_weight_bytes(self) -> int:
        """Bytes of one routed expert's weights: P_e · b_w."""
        return self.params_per_expert * self.weight_bytes_per_param

    @property
    def router_params(self) -> int:
        return self.num_experts * self.hidden_size

    @property
    def total_params(self) -> int:
        """All parameters of the layer: router, every routed expert, every shared expert."""
        return (
            self.router_params
            + self.num_experts * self.params_per_expert
            + self.num_shared_experts * self.params_per_shared_expert
        )

    @property
    def total_weight_bytes(self) -> int:
        return self.total_params * self.weight_bytes_per_param

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


def load_preset(name: str) -> MoESpec:
    """The shipped preset ``name`` (case-insensitive), or UserError listing what exists."""
    files = _preset_files()
    key = name.strip().lower()
    if key not in files:
        raise UserError(f"unknown model {name!r}; known models: {', '.join(list_presets())}")
    try:
        data = json.loads(files[key].read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"preset {key}: malformed JSON ({exc})") from None
    return MoESpec.from_dict(data, origin=f"preset {key}")
