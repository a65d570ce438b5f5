"""Routing: which experts each token goes to, and with what weight.

A routing is a pair of tensors: ``topk_ids`` int64 [T, k] (distinct experts per row) and
``topk_weights`` float32 [T, k]. It comes from the router as the spec describes it (scoring,
group-limited choice, selection bias, normalisation, scaling: see ``spec``), or its ids are
forced by a synthetic distribution or a recorded trace; the weights are then the router's for
those ids, so every source goes through the same arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from moecap_kernels.errors import UserError
from moecap_kernels.limits import MAX_EXPERTS, MAX_TOKENS
from moecap_kernels.spec import MoESpec
from moecap_kernels.weights import MoEWeights

SYNTHETIC_KINDS = ("uniform", "zipf", "dirichlet", "hot")


@dataclass(frozen=True)
class RoutingChoice:
    """How a run picks its routed experts: ``router``, a synthetic ``kind[:param]``, or a ``trace``."""

    kind: str
    param: float | None = None
    path: Path | None = None

    def describe(self) -> str:
        if self.kind == "trace":
            return f"trace:{self.path}"
        return self.kind if self.param is None else f"{self.kind}:{self.param:g}"


def parse_routing(text: str) -> RoutingChoice:
    """Parse ``router``, ``uniform``, ``zipf:ALPHA``, ``dirichlet:ALPHA``, ``hot:N`` or ``trace:PATH``."""
    kind, _, arg = text.strip().partition(":")
    kind = kind.lower()
    if kind in ("router", "uniform"):
        if arg:
            raise UserError(f"routing {kind!r} takes no parameter, got {text!r}")
        return RoutingChoice(kind)
    if kind == "trace":
        if not arg:
            raise UserError("routing trace needs a path: --routing trace:PATH.npy")
        return RoutingChoice(kind, path=Path(arg))
    if kind not in SYNTHETIC_KINDS:
        raise UserError(
            f"unknown routing {text!r}; use router, uniform, zipf:ALPHA, dirichlet:ALPHA, hot:N or trace:PATH"
        )
    try:
        value = float(arg)
    except ValueError:
        raise UserError(f"routing {kind} needs a number, e.g. {kind}:{1.2 if kind != 'hot' else 2}") from None
    if not np.isfinite(value) or value <= 0 or (kind == "hot" and value != int(value)):
        what = "integer" if kind == "hot" else "number"
        raise UserError(f"routing {kind} needs a positive {what}, got {arg!r}")
    return RoutingChoice(kind, param=value)


# --- router -------------------------------------------------------------------------------


def router_logits(x: torch.Tensor, weights: MoEWeights, spec: MoESpec) -> torch.Tensor:
    """Logits [T, E] in float32: x @ W_rᵀ (+ the router's bias), computed in x's dtype."""
    logits = x @ weights.router.T
    if spec.router_bias:
        logits = logits + weights.router_bias
    return logits.float()


def route_tokens(
    x: torch.Tensor, weights: MoEWeights, spec: MoESpec, forced_ids: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's routing of ``x``: ``route`` of its router's logits."""
    return route(router_logits(x, weights, spec), spec, weights.selection_bias, forced_ids)


def route(
    logits: torch.Tensor,
    spec: MoESpec,
    selection_bias: torch.Tensor | None = None,
    forced_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(topk_ids int64 [T, k], topk_weights float32 [T, k]) from float32 router logits [T, E].

    Scores by ``spec.router_scoring``; experts chosen by ``spec.topk_method`` on the scores plus
    ``selection_bias`` (when the spec has one), or given as ``forced_ids`` (synthetic or trace
    routing); weights are the unbiased scores of the chosen experts, normalised and scaled as the
    spec says.
    """
    if spec.router_scoring == "sparsemixer":
        return _sparsemixer(logits, spec.sparsemixer_eps, forced_ids)
    if spec.router_scoring == "softmax_topk":
        ids = forced_ids if forced_ids is not None else _choose(logits, spec, selection_bias)
        weights = logits.gather(1, ids).softmax(dim=-1)
    else:
        scores = logits.softmax(dim=-1) if spec.router_scoring == "softmax" else logits.sigmoid()
        ids = forced_ids if forced_ids is not None else _choose(scores, spec, selection_bias)
        weights = scores.gather(1, ids)
    return ids, _normalise(weights, spec)


def _choose(scores: torch.Tensor, spec: MoESpec, selection_bias: torch.Tensor | None) -> torch.Tensor:
    """The k experts per token: top-k of the (biased) scores, within the groups kept when limited."""
    chosen = scores + selection_bias if spec.selection_bias else scores
    if spec.topk_method != "greedy":
        tokens = chosen.shape[0]
        grouped = chosen.view(tokens, spec.n_group, spec.num_experts // spec.n_group)
        if spec.topk_method == "group_max":  # DeepSeek-V2: a group ranks by its best expert
            group_scores, fill = grouped.max(dim=-1).values, 0.0
        else:  # DeepSeek-V3: by the sum of its two best
            group_scores, fill = grouped.topk(2, dim=-1).values.sum(dim=-1), float("-inf")
        kept = group_scores.topk(spec.topk_group, dim=-1).indices
        mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, kept, True)
        chosen = grouped.masked_fill(~mask[:, :, None], fill).view(tokens, spec.num_experts)
    return chosen.topk(spec.top_k, dim=-1).indices


def _normalise(weights: torch.Tensor, spec: MoESpec) -> torch.Tensor:
    if spec.renormalize:
        norm = weights.sum(dim=-1, keepdim=True) if spec.norm_p == 1 else weights.norm(spec.norm_p, -1, True)
        weights = weights / norm
    return weights * spec.routed_scaling_factor if spec.routed_scaling_factor != 1 else weights


def _sparsemixer(
    logits: torch.Tensor, eps: float, forced_ids: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """PhiMoE's top-2 (evaluation form): rank r takes the best expert not yet taken (or the forced
    one); its weight is a softmax over the experts not yet taken whose logits lie within a relative
    2·eps of its own. The two weights are not normalised."""
    available = logits
    ids, weights = [], []
    for rank in range(2):
        if forced_ids is None:
            best, pick = available.max(dim=-1, keepdim=True)
        else:
            pick = forced_ids[:, rank : rank + 1]
            best = logits.gather(1, pick)
        far = (best - logits) / logits.abs().clamp(min=best) > 2 * eps
        weights.append(available.masked_fill(far, float("-inf")).softmax(dim=-1).gather(1, pick))
        ids.append(pick)
        available = available.scatter(1, pick, float("-inf"))
    return torch.cat(ids, dim=1), torch.cat(weights, dim=1)


# --- synthetic distributions --------------------------------------------------------------


def _distinct_draws(popularity: torch.Tensor, tokens: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """k distinct experts per token, drawn without replacement with probability ∝ popularity."""
    probs = popularity.double().clamp_min(1e-300).expand(tokens, -1)
    return torch.multinomial(probs, k, replacement=False, generator=gen)


def check_routing(choice: RoutingChoice, spec: MoESpec) -> None:
    """Refuse a synthetic routing that cannot be drawn for ``spec`` (before any work is done)."""
    if choice.kind == "hot" and not spec.top_k <= int(choice.param or 0) <= spec.num_experts:
        raise UserError(
            f"routing hot:{int(choice.param or 0)} needs top_k ({spec.top_k}) <= N <= "
            f"num_experts ({spec.num_experts})"
        )


def synthetic_ids(choice: RoutingChoice, tokens: int, spec: MoESpec, seed: int) -> torch.Tensor:
    """int64 [tokens, k] expert ids drawn from a seeded synthetic distribution (CPU tensor)."""
    check_routing(choice, spec)
    e, k = spec.num_experts, spec.top_k
    gen = torch.Generator().manual_seed(seed)
    if choice.kind == "uniform":
        return _distinct_draws(torch.ones(e), tokens, k, gen)
    if choice.kind == "zipf":
        ranks = torch.randperm(e, generator=gen).double() + 1.0
        return _distinct_draws(ranks.pow(-choice.param), tokens, k, gen)
    if choice.kind == "dirichlet":
        popularity = np.random.default_rng(seed).dirichlet(np.full(e, choice.param))
        return _distinct_draws(torch.from_numpy(popularity), tokens, k, gen)
    if choice.kind == "hot":
        n_hot = int(choice.param)
        hot = torch.randperm(e, generator=gen)[:n_hot]
        picks = _distinct_draws(torch.ones(n_hot), tokens, k, gen)
        return hot[picks]
    raise UserError(f"routing {choice.describe()} is not synthetic")


# --- trace replay -------------------------------------------------------------------------


def _check_npy_header(path: Path) -> None:
    """Refuse, before reading any data, a file whose header is not a bounded [T, k] integer array
    or promises more data than the file holds (np.load would allocate what the header claims)."""
    try:
        with path.open("rb") as handle:
            if handle.read(4) == b"PK\x03\x04":
                raise UserError(f"trace {path}: expected one .npy array, got an .npz archive")
            handle.seek(0)
            version = np.lib.format.read_magic(handle)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(handle)
            elif version == (2, 0):
                shape, _, dtype = np.lib.format.read_array_header_2_0(handle)
            else:
                raise UserError(f"trace {path}: .npy format version {version} is not supported")
            data_start = handle.tell()
    except FileNotFoundError:
        raise UserError(f"trace {path}: no such file") from None
    except (ValueError, OSError, EOFError, SyntaxError) as exc:
        raise UserError(f"trace {path}: not a readable .npy array ({_first_line(exc)})") from None
    if len(shape) != 2:
        raise UserError(f"trace {path}: expected a [T, k] array, got shape {list(shape)}")
    tokens, k = shape
    if tokens > MAX_TOKENS or k > MAX_EXPERTS:
        raise UserError(
            f"trace {path}: shape {list(shape)} is beyond the limits of {MAX_TOKENS} tokens "
            f"and {MAX_EXPERTS} experts per token"
        )
    if dtype.hasobject:
        raise UserError(f"trace {path}: expert ids must be integers, got dtype {dtype}")
    missing = data_start + tokens * k * dtype.itemsize - path.stat().st_size
    if missing > 0:
        raise UserError(f"trace {path}: truncated: its header promises {missing} bytes more than it holds")


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0][:120]


def load_trace(path: Path, spec: MoESpec) -> torch.Tensor:
    """A recorded routing: an integer .npy array [T, k] of expert ids, validated against ``spec``."""
    _check_npy_header(path)
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise UserError(f"trace {path}: not a readable .npy array ({_first_line(exc)})") from None
    if array.ndim != 2 or array.shape[0] == 0:
        raise UserError(f"trace {path}: expected a [T, k] array with T >= 1, got shape {list(array.shape)}")
    if not np.issubdtype(array.dtype, np.integer):
        raise UserError(f"trace {path}: expert ids must be integers, got dtype {array.dtype}")
    if array.shape[1] != spec.top_k:
        raise UserError(
            f"trace {path}: has k={array.shape[1]} experts per token, {spec.name} routes top_k={spec.top_k}"
        )
    bad = (array < 0) | (array >= spec.num_experts)
    if bad.any():
        t, j = map(int, np.argwhere(bad)[0])
        raise UserError(
            f"trace {path}: expert id {int(array[t, j])} at token {t} is out of range [0, {spec.num_experts})"
        )
    ordered = np.sort(array, axis=1)
    repeats = np.nonzero((ordered[:, 1:] == ordered[:, :-1]).any(axis=1))[0]
    if repeats.size:
        raise UserError(f"trace {path}: token {int(repeats[0])} lists the same expert twice")
    return torch.from_numpy(array.astype(np.int64))
