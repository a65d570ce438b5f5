"""Record a real model's routing: ``python -m moecap_kernels.record --weights DIR --prompts FILE
--out trace.npz [--steps N]``.

Runs a local Hugging Face checkpoint with transformers: prefill of the prompts (one per line; text
when the folder has a tokenizer, else whitespace-separated token ids), then ``--steps`` greedy decode
steps, with a forward hook on every MoE layer's router that keeps the experts it chose. Writes
(atomically) an ``.npz`` of int64 arrays per MoE layer i: ``layer_<i>`` ``[steps, prompts, k]`` (the
decode steps, in order), ``prefill_layer_<i>`` ``[prompt tokens, k]`` (padding left out) and
``counts_layer_<i>`` ``[E]`` (pairs per expert over the decode steps), plus ``meta`` (JSON text).
Exit codes as the profiler's: 2 with one line for bad input, 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import io
import json
from collections.abc import Sequence
from pathlib import Path

from moecap_kernels.errors import UserError
from moecap_kernels.exits import Interrupt, run_cli
from moecap_kernels.files import check_writable

MAX_STEPS = 1 << 14


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    from moecap_kernels.profile import _Parser, integer, text_arg

    p = _Parser(prog="python -m moecap_kernels.record", description="Record a model's routing, step by step.")
    p.add_argument("--weights", type=text_arg, required=True, help="a local Hugging Face checkpoint folder")
    p.add_argument("--prompts", type=text_arg, required=True, help="one prompt per line (text, or token ids)")
    p.add_argument("--out", type=text_arg, required=True, help="the .npz to write")
    p.add_argument("--steps", type=integer(1, MAX_STEPS), default=16, help="greedy decode steps (default 16)")
    p.add_argument("--device", type=text_arg, default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--dtype", type=text_arg, help="bfloat16 | float16 | float32 (default: the checkpoint's)")
    args = p.parse_args(argv)
    if not Path(args.weights).expanduser().is_dir():
        raise UserError(f"--weights {args.weights}: not a folder")
    if not Path(args.prompts).expanduser().is_file():
        raise UserError(f"--prompts {args.prompts}: no such file")
    check_writable(args.out, "--out")
    return args


def router_modules(model, layers: list[int], num_experts: int, hidden: int) -> dict[int, str]:
    """{MoE layer: module path of its router}: in each layer, the module holding an [E, H] weight of
    its own (its parent when that is a bare projection inside a router: ``router.layer``, ``gate.wg``)."""
    import re

    found: dict[int, str] = {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        match = re.search(r"(?:^|\.)layers\.(\d+)\.", name + ".")
        if match is None or weight is None or tuple(weight.shape) != (num_experts, hidden):
            continue
        layer = int(match.group(1))
        if layer in layers and layer not in found and "expert" not in name.split(".")[-1]:
            found[layer] = name.rsplit(".", 1)[0] if name.split(".")[-1] in ("layer", "wg") else name
    missing = [layer for layer in layers if layer not in found]
    if missing:
        raise UserError(f"the model has no [{num_experts}, {hidden}] router in layer {missing[0]}")
    return found


def chosen_experts(outputs: object, k: int, num_experts: int):  # -> torch.Tensor [T, k]
    """The experts a router chose, from whatever it returns: an int64 [T, k] tensor among its
    outputs, scores [T, E] that are zero where not chosen, or else the top-k of its logits."""
    import torch

    tensors = [
        t.detach()
        for t in (outputs if isinstance(outputs, tuple) else (outputs,))
        if isinstance(t, torch.Tensor)
    ]
    for t in tensors:
        if t.dtype == torch.int64 and t.dim() == 2 and t.shape[1] == k:
            return t
    for t in tensors:
        if (
            t.is_floating_point()
            and t.dim() == 2
            and t.shape[1] == num_experts
            and ((t != 0).sum(-1) == k).all()
        ):
            return (t != 0).nonzero()[:, 1].view(-1, k)
    logits = next(t for t in tensors if t.is_floating_point())
    return logits.reshape(-1, num_experts).topk(k, dim=-1).indices


def read_prompts(path: Path, folder: Path):  # -> (input_ids [B, L], attention_mask [B, L])
    """Prompts as left-padded token ids: text through the folder's tokenizer, or ids as written."""
    import torch

    lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not lines:
        raise UserError(f"--prompts {path}: no prompt in the file")
    if all(all(w.isdigit() for w in line.split()) for line in lines):
        rows = [[int(w) for w in line.split()] for line in lines]
    else:
        try:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(folder)
        except (OSError, ValueError) as exc:
            why = str(exc).splitlines()[0][:80]
            raise UserError(f"--prompts {path}: text prompts need a tokenizer in {folder} ({why})") from None
        rows = [tokenizer(line)["input_ids"] for line in lines]
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.int64)
    mask = torch.zeros(len(rows), width, dtype=torch.int64)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r)
        mask[i, width - len(r) :] = 1
    return ids, mask


def record(args: argparse.Namespace) -> dict[str, object]:
    """The arrays of the .npz (module docstring)."""
    import numpy as np
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    from moecap_kernels.checkpoint import moe_layers, open_checkpoint
    from moecap_kernels.dtypes import canonical_dtype, torch_dtype
    from moecap_kernels.hf_config import read_hf_config
    from moecap_kernels.profile import resolve_device

    folder = Path(args.weights).expanduser()
    spec, _ = read_hf_config(folder, canonical_dtype(args.dtype) if args.dtype else None)
    layers = moe_layers(open_checkpoint(folder))
    if not layers:
        raise UserError(f"--weights {folder}: no MoE layer found (no router tensor under a known name)")
    device = resolve_device(args.device)
    transformers.utils.logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype(spec.act_dtype)).to(device).eval()
    routers = router_modules(model, layers, spec.num_experts, spec.hidden_size)
    ids, mask = read_prompts(Path(args.prompts).expanduser(), folder)
    vocab = model.get_input_embeddings().num_embeddings
    if int(ids.max()) >= vocab:
        raise UserError(f"--prompts: token id {int(ids.max())} is beyond the model's vocabulary of {vocab}")
    calls: dict[int, list[torch.Tensor]] = {layer: [] for layer in routers}
    hooks = []
    for layer, name in routers.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise UserError(
                f"--weights {folder}: the model has no module {name!r} (its router's tensor)"
            ) from None
        keep = calls[layer]
        hooks.append(
            module.register_forward_hook(
                lambda m, a, out, keep=keep: keep.append(
                    chosen_experts(out, spec.top_k, spec.num_experts).cpu()
                )
            )
        )
    ids, mask = ids.to(device), mask.to(device)
    with torch.no_grad():
        past, tokens, attention = None, ids, mask
        for _ in range(args.steps + 1):  # the prefill, then one forward per decode step
            Interrupt.check()
            out = model(input_ids=tokens, attention_mask=attention, past_key_values=past, use_cache=True)
            past = out.past_key_values
            tokens = out.logits[:, -1].argmax(dim=-1, keepdim=True)
            attention = torch.cat([attention, torch.ones_like(tokens)], dim=1)
    for hook in hooks:
        hook.remove()
    arrays: dict[str, object] = {}
    real = mask.reshape(-1).bool().cpu()
    batch = ids.shape[0]
    for layer, chosen in calls.items():
        if len(chosen) != args.steps + 1 or any(c.shape[0] != batch for c in chosen[1:]):
            raise RuntimeError(
                f"layer {layer}: the router ran {len(chosen)} times, expected {args.steps + 1}"
            )
        decode = torch.stack(chosen[1:]).numpy().astype(np.int64)
        arrays[f"layer_{layer}"] = decode
        arrays[f"prefill_layer_{layer}"] = chosen[0][real].numpy().astype(np.int64)
        arrays[f"counts_layer_{layer}"] = torch.bincount(
            torch.stack(chosen[1:]).reshape(-1), minlength=spec.num_experts
        ).numpy()
    arrays["meta"] = np.array(
        json.dumps(
            {
                "weights": str(folder),
                "steps": args.steps,
                "prompts": batch,
                "layers": list(routers),
                "top_k": spec.top_k,
                "num_experts": spec.num_experts,
            }
        )
    )
    return arrays


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from moecap_kernels.files import write_atomic

    arrays = record(args)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    write_atomic(args.out, buffer.getvalue())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(lambda: run(parse_args(argv)))


if __name__ == "__main__":
    raise SystemExit(main())
