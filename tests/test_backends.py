"""loop and grouped backends (and the float64 reference) against a per-pair float64 loop."""

from __future__ import annotations

import pytest
import torch

from moecap_kernels.backends import backend_names, get_backend
from moecap_kernels.dtypes import torch_dtype
from moecap_kernels.errors import UserError
from moecap_kernels.reference import reference_forward, relative_error
from moecap_kernels.routing import route_tokens
from moecap_kernels.weights import random_weights
from tests.helpers import per_pair_reference, tiny_spec

TOLERANCE = {"float32": 1e-5, "bfloat16": 1e-2, "float16": 1e-2}
LAYERS = {
    "gated-silu": {},
    "gelu": {"activation": "gelu"},
    "not-gated": {"gated": False},
    "shared": {"num_shared_experts": 2, "shared_intermediate_size": 24},
    "k=E": {"num_experts": 4, "top_k": 4},
    "sigmoid": {"router_scoring": "sigmoid", "renormalize": False},
    "gelu-tanh": {"activation": "gelu_tanh"},
    "gpt-oss": {  # router bias, softmax over the top-k, expert biases, clamped SwiGLU
        "router_bias": True, "router_scoring": "softmax_topk", "renormalize": False,
        "expert_bias": True, "activation": "swiglu_oai", "swiglu_limit": 0.5,
    },
    "llama4": {  # sigmoid of the top-k logits scales each expert's input; a plain shared expert
        "router_scoring": "sigmoid", "renormalize": False, "weights_on_input": True,
        "num_shared_experts": 1, "shared_intermediate_size": 40,
    },
    "qwen2-moe": {"num_shared_experts": 1, "shared_intermediate_size": 56, "shared_expert_gate": True,
                  "renormalize": False},
    "deepseek-v3": {  # group-limited choice on biased sigmoid scores, normalised then scaled
        "router_scoring": "sigmoid", "topk_method": "group_top2_sum", "n_group": 4, "topk_group": 2,
        "selection_bias": True, "routed_scaling_factor": 2.5, "num_shared_experts": 1,
        "shared_intermediate_size": 40,
    },
    "phimoe": {"router_scoring": "sparsemixer", "renormalize": False},
}  # fmt: skip


def routed(spec, tokens, seed, forced=None):
    weights = random_weights(spec, seed=seed)
    x = torch.randn(tokens, spec.hidden_size, generator=torch.Generator().manual_seed(seed + 1))
    x = x.to(torch_dtype(spec.act_dtype))
    ids, topk_weights = route_tokens(x, weights, spec, forced)
    return x, weights, ids, topk_weights


@pytest.mark.parametrize("layer", list(LAYERS))
def test_reference_equals_per_pair_loop(layer):
    spec = tiny_spec(**LAYERS[layer]).with_dtype("float32")
    x, weights, ids, w = routed(spec, 5, seed=3)
    expected = per_pair_reference(x, weights, spec, ids, w)
    assert relative_error(reference_forward(x, weights, spec, ids, w), expected) < 1e-12


@pytest.mark.parametrize("backend", ["loop", "grouped"])
@pytest.mark.parametrize("dtype", list(TOLERANCE))
@pytest.mark.parametrize("layer", list(LAYERS))
@pytest.mark.parametrize("tokens", [1, 7, 33])
def test_backend_matches_float64(backend, dtype, layer, tokens):
    spec = tiny_spec(**LAYERS[layer]).with_dtype(dtype)
    x, weights, ids, w = routed(spec, tokens, seed=tokens)
    y = get_backend(backend).forward(x, weights, spec, ids, w)
    assert y.dtype == x.dtype and y.shape == x.shape
    assert relative_error(y, reference_forward(x, weights, spec, ids, w)) < TOLERANCE[dtype]


@pytest.mark.parametrize("backend", ["loop", "grouped"])
@pytest.mark.parametrize("case", ["all-to-one", "every-expert", "one-token"])
def test_backend_edge_routings(backend, case):
    spec = tiny_spec(num_experts=6, top_k=2).with_dtype("float32")
    tokens = {"all-to-one": 9, "every-expert": 12, "one-token": 1}[case]
    forced = {
        "all-to-one": torch.tensor([[4, 1]] * tokens),
        "every-expert": torch.tensor([[t % 6, (t + 1) % 6] for t in range(tokens)]),
        "one-token": torch.tensor([[5, 0]]),
    }[case]
    x, weights, ids, w = routed(spec, tokens, seed=11, forced=forced)
    y = get_backend(backend).forward(x, weights, spec, ids, w)
    assert relative_error(y, per_pair_reference(x, weights, spec, ids, w)) < 1e-5


def test_registry_names_and_unknown_backend():
    assert {"loop", "grouped"} <= set(backend_names())
    with pytest.raises(UserError, match="unknown backend"):
        get_backend("nope")
