"""One MoE layer's weights from a local safetensors checkpoint: only that layer's tensors are read
(``safetensors.safe_open``; an index file maps names to shards).

The names are found, not configured: a layer prefix (``model.layers.N.``, ``model.language_model
.layers.N.``, ``language_model.model.layers.N.``, ``thinker.model.layers.N.``, ``transformer.blocks
.N.``), a module holding the router (``mlp``, ``block_sparse_moe``, ``feed_forward``, ``ffn``), then
the router, the experts and the shared experts under the names each family writes, per expert
(``experts.E.gate_proj`` / ``w1``, as ``save_pretrained`` and the Hub store them) or fused
(``experts.gate_up_proj``, as transformers 5 holds them and gpt-oss, Llama 4 and Qwen3-VL store
them). Everything is brought to the layout of ``weights``: [E, 2F, H] with the gate rows first,
[E, H, F]. A tensor that is missing or has the wrong shape is a one-line UserError naming it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from moecap_kernels.dtypes import torch_dtype
from moecap_kernels.errors import UserError
from moecap_kernels.limits import MAX_SMALL_FILE_BYTES
from moecap_kernels.spec import MoESpec
from moecap_kernels.weights import MoEWeights

LAYER_PREFIXES = (
    "model.layers.{n}.",
    "model.language_model.layers.{n}.",
    "language_model.model.layers.{n}.",
    "thinker.model.layers.{n}.",
    "transformer.blocks.{n}.",
)
MOE_MODULES = ("mlp.", "block_sparse_moe.", "feed_forward.", "ffn.")
ROUTERS = ("gate.weight", "router.weight", "router.layer.weight", "gate.wg.weight")
SELECTION_BIASES = (
    "gate.e_score_correction_bias",
    "gate.expert_bias",
    "moe_statics.e_score_correction_bias",
    "e_score_correction_bias",
    "expert_bias",
)
PER_EXPERT_NAMES = (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2"))


@dataclass
class Checkpoint:
    """The tensors of a safetensors checkpoint folder, by name, read on demand."""

    folder: Path
    files: dict[str, Path]  # tensor name -> the file holding it

    def has(self, name: str) -> bool:
        return name in self.files

    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        if name not in self.files:
            raise UserError(f"checkpoint {self.folder}: tensor {name!r} not found")
        try:
            with safe_open(self.files[name], framework="pt") as handle:
                return handle.get_tensor(name)
        except (OSError, ValueError, RuntimeError) as exc:
            raise UserError(f"checkpoint {self.folder}: cannot read {name!r} ({str(exc)[:120]})") from None


def open_checkpoint(folder: str | Path) -> Checkpoint:
    """The tensor names of a folder holding ``model.safetensors`` or an index and its shards."""
    from safetensors import safe_open

    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise UserError(f"--weights {folder}: not a folder")
    index = folder / "model.safetensors.index.json"
    files: dict[str, Path] = {}
    if index.is_file():
        try:
            if index.stat().st_size > 64 * MAX_SMALL_FILE_BYTES:
                raise ValueError("too big for an index")
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            files = {str(name): folder / str(shard) for name, shard in dict(weight_map).items()}
        except (OSError, ValueError, KeyError, TypeError, RecursionError) as exc:
            raise UserError(f"--weights {index}: not a readable index ({str(exc)[:120]})") from None
    else:
        shards = sorted(folder.glob("*.safetensors"))
        if not shards:
            raise UserError(f"--weights {folder}: no .safetensors files and no model.safetensors.index.json")
        for shard in shards:
            try:
                with safe_open(shard, framework="pt") as handle:
                    files.update(dict.fromkeys(handle.keys(), shard))
            except (OSError, ValueError, RuntimeError) as exc:
                raise UserError(
                    f"--weights {shard}: not a readable safetensors file ({str(exc)[:120]})"
                ) from None
    return Checkpoint(folder, files)


def moe_layers(ckpt: Checkpoint) -> list[int]:
    """The layer indices whose MoE router the checkpoint holds, in order."""
    found = set()
    for prefix in LAYER_PREFIXES:
        pattern = re.compile(re.escape(prefix).replace(r"\{n\}", r"(\d+)"))
        for name in ckpt.files:
            match = pattern.match(name)
            if match and any(name == match.group(0) + m + r for m in MOE_MODULES for r in ROUTERS):
                found.add(int(match.group(1)))
    return sorted(found)


def _module(ckpt: Checkpoint, layer: int) -> tuple[str, str]:
    """(the layer's prefix, that prefix plus the module holding its router)."""
    for prefix in (p.format(n=layer) for p in LAYER_PREFIXES):
        for module in MOE_MODULES:
            if any(ckpt.has(prefix + module + r) for r in ROUTERS):
                return prefix, prefix + module
    layers = moe_layers(ckpt)
    shown = ", ".join(map(str, layers[:12])) + (" ..." if len(layers) > 12 else "")
    raise UserError(
        f"--weights {ckpt.folder}: layer {layer} has no MoE router"
        + (f"; its MoE layers are {shown}" if layers else "; no MoE layer found (unknown tensor names)")
    )


def _first(ckpt: Checkpoint, names: Iterable[str]) -> str | None:
    return next((n for n in names if ckpt.has(n)), None)


DENSE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class _Shapes:
    """Checks every tensor against the spec's shape, naming it when it does not fit, and refuses
    quantized tensors (fp8 or integer codes): read without their scales they would be wrong values."""

    def __init__(self, ckpt: Checkpoint) -> None:
        self.ckpt = ckpt

    def get(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        tensor = self.ckpt.get(name)
        if tensor.dtype not in DENSE_DTYPES:
            stored = str(tensor.dtype).removeprefix("torch.")
            raise UserError(
                f"--weights {self.ckpt.folder}: {name!r} is stored as {stored}"
                ": loading a quantized checkpoint's own tensors is not implemented; profile its config "
                "(--config, random weights in its format) or a dense checkpoint with --quant"
            )
        if tuple(tensor.shape) != shape:
            raise UserError(
                f"--weights {self.ckpt.folder}: {name!r} has shape {list(tensor.shape)}, the config's layer "
                f"needs {list(shape)}"
            )
        return tensor


def _experts(
    ckpt: Checkpoint, m: str, spec: MoESpec
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor | None]]:
    """(w_in [E, F_in, H], w_out [E, H, F], [w_in_bias, w_out_bias]) in the checkpoint's dtype."""
    e, h, f = spec.num_experts, spec.hidden_size, spec.intermediate_size
    shapes = _Shapes(ckpt)
    for gate, up, down in PER_EXPERT_NAMES:
        if ckpt.has(f"{m}experts.0.{gate}.weight"):
            w_in = torch.stack(
                [
                    torch.cat(
                        [shapes.get(f"{m}experts.{i}.{gate}.weight", (f, h))]
                        + ([shapes.get(f"{m}experts.{i}.{up}.weight", (f, h))] if spec.gated else [])
                    )
                    for i in range(e)
                ]
            )
            w_out = torch.stack([shapes.get(f"{m}experts.{i}.{down}.weight", (h, f)) for i in range(e)])
            return w_in, w_out, [None, None]
    if ckpt.has(f"{m}experts.gate_up_proj") and spec.expert_bias:  # gpt-oss: [E, H, 2F], gate/up interleaved
        gate_up = shapes.get(f"{m}experts.gate_up_proj", (e, h, 2 * f)).transpose(1, 2)
        bias = shapes.get(f"{m}experts.gate_up_proj_bias", (e, 2 * f))
        w_in = torch.cat([gate_up[:, 0::2], gate_up[:, 1::2]], dim=1)
        b_in = torch.cat([bias[:, 0::2], bias[:, 1::2]], dim=1)
        w_out = shapes.get(f"{m}experts.down_proj", (e, f, h)).transpose(1, 2)
        return w_in, w_out, [b_in, shapes.get(f"{m}experts.down_proj_bias", (e, h))]
    if ckpt.has(
        f"{m}experts.gate_up_proj"
    ):  # fused: [E, 2F, H] (transformers 5) or [E, H, 2F] (Llama 4, Qwen3-VL)
        gate_up, down = ckpt.get(f"{m}experts.gate_up_proj"), ckpt.get(f"{m}experts.down_proj")
        # Llama 4 always stores them transposed; a Qwen3-VL checkpoint does when the shape says so
        if spec.weights_on_input or (tuple(gate_up.shape) == (e, h, 2 * f) and h != 2 * f):
            gate_up = gate_up.transpose(1, 2)
        if spec.weights_on_input or (tuple(down.shape) == (e, f, h) and h != f):
            down = down.transpose(1, 2)
        for name, tensor, shape in (("gate_up_proj", gate_up, (e, 2 * f, h)), ("down_proj", down, (e, h, f))):
            if tuple(tensor.shape) != shape:
                got = list(tensor.shape)
                raise UserError(
                    f"--weights {ckpt.folder}: {m}experts.{name} has shape {got}, needs {list(shape)}"
                )
        return gate_up, down, [None, None]
    if ckpt.has(f"{m}input_linear.weight"):  # GraniteMoe's parallel experts
        w_in = shapes.get(f"{m}input_linear.weight", (e, 2 * f, h))
        return w_in, shapes.get(f"{m}output_linear.weight", (e, h, f)), [None, None]
    if ckpt.has(f"{m}experts.mlp.w1"):  # DBRX: [E·F, H] each; w2 is used untransposed (h @ w2)
        gate = shapes.get(f"{m}experts.mlp.w1", (e * f, h)).view(e, f, h)
        up = shapes.get(f"{m}experts.mlp.v1", (e * f, h)).view(e, f, h)
        down = shapes.get(f"{m}experts.mlp.w2", (e * f, h)).view(e, f, h).transpose(1, 2)
        return torch.cat([gate, up], dim=1), down, [None, None]
    raise UserError(f"--weights {ckpt.folder}: no expert tensors found under {m!r}")


def _shared(ckpt: Checkpoint, prefix: str, m: str, spec: MoESpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(shared_w_in [S, F_in_s, H], shared_w_out [S, H, F_s]); one fused MLP of width S·F_s is split."""
    s, h, fs = spec.num_shared_experts, spec.hidden_size, spec.shared_intermediate_size
    if not s:
        return torch.empty(0, 2 * fs if spec.gated else fs, h), torch.empty(0, h, fs)
    shapes = _Shapes(ckpt)
    for module in (f"{m}shared_expert.", f"{m}shared_experts.", f"{m}shared_mlp."):
        if ckpt.has(module + "gate_proj.weight"):
            gate = shapes.get(module + "gate_proj.weight", (s * fs, h)).view(s, fs, h)
            up = shapes.get(module + "up_proj.weight", (s * fs, h)).view(s, fs, h)
            down = shapes.get(module + "down_proj.weight", (h, s * fs)).view(h, s, fs).permute(1, 0, 2)
            return torch.cat([gate, up], dim=1), down.contiguous()
    for module in (f"{prefix}shared_mlp.", f"{m}shared_mlp."):  # GraniteMoeShared: one fused [2F_s, H]
        if ckpt.has(module + "input_linear.weight"):
            w_in = shapes.get(module + "input_linear.weight", (2 * fs, h))[None]
            return w_in, shapes.get(module + "output_linear.weight", (h, fs))[None]
    raise UserError(f"--weights {ckpt.folder}: the config has shared experts, no shared expert tensors found")


def load_layer(
    folder: str | Path, spec: MoESpec, layer: int, device: torch.device | str = "cpu"
) -> MoEWeights:
    """The weights of MoE layer ``layer`` of the checkpoint in ``folder``, as ``spec`` describes them,
    in ``spec.weight_dtype`` on ``device`` (the correction bias in float32)."""
    ckpt = open_checkpoint(folder)
    prefix, m = _module(ckpt, layer)
    e, h = spec.num_experts, spec.hidden_size
    shapes = _Shapes(ckpt)
    router = shapes.get(_first(ckpt, (m + r for r in ROUTERS)), (e, h))  # _module found one
    router_bias = shapes.get(m + "router.bias", (e,)) if spec.router_bias else None
    selection = None
    if spec.selection_bias:
        name = _first(ckpt, (m + b for b in SELECTION_BIASES))
        if name is None:
            raise UserError(
                f"--weights {ckpt.folder}: the config's router needs a correction bias; none under {m!r}"
            )
        selection = ckpt.get(name).reshape(-1).float()
        if selection.numel() != e:
            raise UserError(f"--weights {ckpt.folder}: {name!r} holds {selection.numel()} values, needs {e}")
    w_in, w_out, (b_in, b_out) = _experts(ckpt, m, spec)
    shared_in, shared_out = _shared(ckpt, prefix, m, spec)
    gate = None
    if spec.shared_expert_gate:
        gate = shapes.get(m + "shared_expert_gate.weight", (spec.num_shared_experts, h))
    dtype, device = torch_dtype(spec.weight_dtype), torch.device(device)

    def put(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.to(device=device, dtype=dtype).contiguous()

    return MoEWeights(
        router=put(router),
        w_in=put(w_in),
        w_out=put(w_out),
        shared_w_in=put(shared_in),
        shared_w_out=put(shared_out),
        router_bias=put(router_bias),
        selection_bias=None if selection is None else selection.to(device),
        w_in_bias=put(b_in),
        w_out_bias=put(b_out),
        shared_gate=put(gate),
    )
