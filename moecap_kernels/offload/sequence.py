"""Routing over time: the top-k expert ids of each decode step, in order, per layer.

A sequence is an int64 array ``[S, T, k]`` (S steps, T tokens per step). Files:

- ``.npy`` ``[S, T, k]``: one layer's steps;
- ``.npz``: ``layer_<i>`` arrays ``[S, T, k]`` (``moecap_kernels.record`` writes these), one per MoE
  layer i; optional ``counts_layer_<i>`` ``[E]``, the pairs per expert the recorder counted itself.

Synthetic sequences, seeded: ``uniform``, ``zipf:A`` and ``dirichlet:A`` draw each step from one
fixed popularity over the experts (drawn once, so the same experts stay hot); ``sticky:P`` keeps,
for each token and each of its k slots, the expert of the previous step with probability P, else
draws a new one uniformly among the experts not yet in the token's row.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from moecap_kernels.errors import UserError
from moecap_kernels.limits import MAX_TOKENS
from moecap_kernels.spec import MoESpec

MAX_STEPS = 1 << 16
SEQUENCE_KINDS = ("uniform", "zipf", "dirichlet", "sticky")


def check_sequence(ids: np.ndarray, spec: MoESpec, where: str) -> np.ndarray:
    """``ids`` as int64 ``[S, T, k]``, refused in one line unless every row is k distinct valid experts."""
    if ids.ndim != 3 or 0 in ids.shape:
        raise UserError(f"{where}: expected a [steps, T, k] array, got shape {list(ids.shape)}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise UserError(f"{where}: expert ids must be integers, got dtype {ids.dtype}")
    steps, tokens, k = ids.shape
    if steps > MAX_STEPS or tokens > MAX_TOKENS:
        raise UserError(
            f"{where}: {steps} steps of {tokens} tokens is beyond {MAX_STEPS} steps of {MAX_TOKENS}"
        )
    if k != spec.top_k:
        raise UserError(f"{where}: k={k} experts per token, {spec.name} routes top_k={spec.top_k}")
    bad = (ids < 0) | (ids >= spec.num_experts)
    if bad.any():
        s, t, j = map(int, np.argwhere(bad)[0])
        raise UserError(f"{where}: expert id {int(ids[s, t, j])} at step {s}, token {t} is out of range")
    ordered = np.sort(ids, axis=2)
    if (ordered[:, :, 1:] == ordered[:, :, :-1]).any():
        s, t = map(int, np.argwhere((ordered[:, :, 1:] == ordered[:, :, :-1]).any(axis=2))[0])
        raise UserError(f"{where}: step {s}, token {t} lists the same expert twice")
    return ids.astype(np.int64)


def load_layers(path: Path, spec: MoESpec) -> dict[int, np.ndarray]:
    """Every layer's steps of a ``.npz`` ({i: [S, T, k]}), or a ``.npy``'s as layer 0, validated."""
    try:
        data = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise UserError(f"sequence {path}: no such file") from None
    except (ValueError, OSError, EOFError) as exc:
        raise UserError(
            f"sequence {path}: not a readable .npy/.npz file ({str(exc).splitlines()[0]})"
        ) from None
    if isinstance(data, np.ndarray):
        return {0: check_sequence(data, spec, f"sequence {path}")}
    with data:
        layers = sorted(int(k[6:]) for k in data.files if k.startswith("layer_") and k[6:].isdigit())
        if not layers:
            raise UserError(f"sequence {path}: no layer_<i> arrays in the archive")
        return {i: check_sequence(data[f"layer_{i}"], spec, f"sequence {path} layer {i}") for i in layers}


def _popularity(kind: str, param: float | None, experts: int, rng: np.random.Generator) -> np.ndarray:
    if kind == "uniform":
        return np.full(experts, 1.0 / experts)
    if kind == "zipf":
        weights = (rng.permutation(experts) + 1.0) ** -float(param)
        return weights / weights.sum()
    return rng.dirichlet(np.full(experts, float(param)))


def _draw_rows(p: np.ndarray, tokens: int, k: int, rng: np.random.Generator) -> np.ndarray:
    return np.stack([rng.choice(len(p), size=k, replace=False, p=p) for _ in range(tokens)])


def synthetic_sequence(
    kind: str, param: float | None, steps: int, tokens: int, spec: MoESpec, seed: int
) -> np.ndarray:
    """int64 ``[steps, tokens, k]`` from a seeded synthetic process (module docstring)."""
    rng = np.random.default_rng(seed)
    e, k = spec.num_experts, spec.top_k
    if kind != "sticky":
        p = _popularity(kind, param, e, rng)
        return np.stack([_draw_rows(p, tokens, k, rng) for _ in range(steps)]).astype(np.int64)
    keep = float(param)
    out = np.empty((steps, tokens, k), dtype=np.int64)
    out[0] = _draw_rows(np.full(e, 1.0 / e), tokens, k, rng)
    for s in range(1, steps):
        for t in range(tokens):
            row = [int(v) if rng.random() < keep else -1 for v in out[s - 1, t]]
            for j in range(k):
                if row[j] < 0:
                    free = np.setdiff1d(np.arange(e), [v for v in row if v >= 0])
                    row[j] = int(rng.choice(free))
            out[s, t] = row
    return out


def parse_sequence_kind(text: str) -> tuple[str, float | None] | None:
    """(kind, parameter) of a synthetic sequence routing, or None when ``text`` names none."""
    kind, _, arg = text.strip().partition(":")
    kind = kind.lower()
    if kind not in SEQUENCE_KINDS:
        return None
    if kind == "uniform":
        return kind, None
    try:
        value = float(arg)
    except ValueError:
        raise UserError(
            f"routing {kind} needs a number, e.g. {kind}:{0.8 if kind == 'sticky' else 1.2}"
        ) from None
    if kind == "sticky" and not 0 <= value <= 1:
        raise UserError(f"routing sticky:P needs a probability from 0 to 1, got {arg!r}")
    if kind != "sticky" and not (np.isfinite(value) and value > 0):
        raise UserError(f"routing {kind} needs a positive number, got {arg!r}")
    return kind, value
