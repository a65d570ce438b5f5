"""The project's layer against the implementation users trust: for every supported family, Hugging
Face transformers' own model (tiny, random, saved with save_pretrained) is read back by the
project's config reader and checkpoint loader, and its MoE layer's output, expert choice and FLOPs
are compared with the project's on the same input, for every CPU backend (triton under the
interpreter). transformers is a test-only dependency, pinned in the ``test`` extra.
"""

from __future__ import annotations

import functools
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from moecap_kernels.backends import get_backend
from moecap_kernels.checkpoint import load_layer, moe_layers, open_checkpoint
from moecap_kernels.counters import CountAccumulator
from moecap_kernels.hf_config import read_hf_config
from moecap_kernels.metrics import work
from moecap_kernels.reference import reference_forward, relative_error
from moecap_kernels.routing import route_tokens
from tests.transformers_models import FAMILIES, TinyFamily, redraw

transformers = pytest.importorskip("transformers")

TOKENS = 13
BACKENDS = ("reference", "loop", "grouped", "cpu_fused", "triton")


class Case:
    """One family's tiny model, saved and read back, and its MoE layer run by transformers."""

    def __init__(self, name: str, family: TinyFamily, folder: Path) -> None:
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = family.build()
        if hasattr(model, "set_experts_implementation"):
            model.set_experts_implementation("eager")  # the per-expert loop: FLOP counters see its GEMMs
        self.block = model.get_submodule(family.block)
        redraw(self.block, seed=1)
        self.shared = model.get_submodule(family.shared_beside) if family.shared_beside else None
        if self.shared is not None:
            redraw(self.shared, seed=2)
        model.save_pretrained(folder)
        self.folder, self.family, self.model = folder, family, model
        self.spec, self.origins = read_hf_config(folder, dtype="float32")
        self.weights = load_layer(folder, self.spec, family.layer)
        self.x = torch.randn(TOKENS, self.spec.hidden_size, generator=torch.Generator().manual_seed(5))
        self.hf_out, self.hf_ids, self.hf_flops = self._transformers()

    def _transformers(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        captured: list = []
        router = self.model.get_submodule(self.family.router)
        hook = router.register_forward_hook(lambda module, args, out: captured.append(out))
        # with autograd on: FlopCounterMode's module tracker hooks the outputs' gradient functions
        with FlopCounterMode(display=False) as flops:
            out = self.block(self.x[None])
            out = (out[0] if isinstance(out, tuple) else out).reshape(TOKENS, -1)
            if self.shared is not None:
                out = out + self.shared(self.x[None]).reshape(TOKENS, -1)
        hook.remove()
        return out.detach().double(), self.chosen(captured[0], TOKENS), flops.get_total_flops()

    def chosen(self, outputs: object, tokens: int) -> torch.Tensor:
        """The experts transformers' router chose, [T, k], from whatever its router returns."""
        k = self.spec.top_k
        tensors = [
            t for t in (outputs if isinstance(outputs, tuple) else (outputs,)) if isinstance(t, torch.Tensor)
        ]
        tensors = [t.detach() for t in tensors]
        for t in tensors:
            if t.dtype == torch.int64 and t.shape == (tokens, k):
                return t
        for t in tensors:  # Llama 4: scores [T, E], zero where not chosen
            if (
                t.is_floating_point()
                and t.shape == (tokens, self.spec.num_experts)
                and ((t != 0).sum(-1) == k).all()
            ):
                return (t != 0).nonzero()[:, 1].view(tokens, k)
        assert self.family.router_gives_logits, "the router's outputs hold no choice of experts"
        return tensors[0].topk(k, dim=-1).indices  # DBRX: softmax then top-k, the top-k of its logits


@functools.cache
def case(name: str) -> Case:
    return Case(name, FAMILIES[name], Path(tempfile.mkdtemp(prefix=f"moecap-hf-{name}-")))


@pytest.mark.parametrize("name", list(FAMILIES))
def test_same_experts_chosen(name: str) -> None:
    c = case(name)
    ids, _ = route_tokens(c.x, c.weights, c.spec)
    assert [set(row) for row in ids.tolist()] == [set(row) for row in c.hf_ids.tolist()]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(FAMILIES))
def test_same_output(name: str, backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    c = case(name)
    ids, w = route_tokens(c.x, c.weights, c.spec)
    if backend == "reference":
        y = reference_forward(c.x, c.weights, c.spec, ids, w)
    else:
        if backend == "triton":
            monkeypatch.setenv("TRITON_INTERPRET", "1")
        runner = get_backend(backend)
        why_not = runner.availability(c.x.device, c.x.dtype) or runner.supports(c.spec)
        if why_not is not None:
            pytest.skip(why_not)
        y = runner.forward(c.x, c.weights, c.spec, ids, w)
    assert relative_error(y, c.hf_out) < 1e-5


@pytest.mark.parametrize("name", list(FAMILIES))
def test_flop_counter_over_transformers_equals_useful_flops(name: str) -> None:
    """FlopCounterMode over transformers' eager block counts exactly the project's useful FLOPs
    (Llama 4 computes every expert on every token: there it counts the dense figure)."""
    c = case(name)
    ids, _ = route_tokens(c.x, c.weights, c.spec)
    counter = CountAccumulator(c.spec, "cpu", use_extension=False)
    counter.add(ids)
    flops = work(c.spec, TOKENS, counter.read().per_forward().expert_flops)
    assert c.hf_flops == (flops.dense if c.family.dense_compute else flops.useful)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_reader_sees_the_layers_transformers_made_sparse(name: str) -> None:
    c = case(name)
    assert c.family.layer in moe_layers(open_checkpoint(c.folder))
    assert all(origin for origin in c.origins.values())


# --- the CLI on a real checkpoint ------------------------------------------------------------------


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    from moecap_kernels.profile import main

    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


FAST = ["--warmup", "0", "--reps", "2", "--peak-bandwidth", "50e9", "--peak-flops", "500e9"]


@pytest.mark.parametrize("name", ["qwen2_moe", "deepseek_v3", "gpt_oss"])
def test_cli_profiles_a_checkpoint_layer_with_the_models_own_routing(tmp_path, capsys, name) -> None:
    """With --weights, --routing router is the model's routing of the profile's inputs: the counted
    experts are those transformers' router picks for the same inputs."""
    import json

    c = case(name)
    tokens = 5
    out_json = tmp_path / "o.json"
    code, _, err = _cli(
        capsys, "--weights", str(c.folder), "--layer", str(c.family.layer), "--dtype", "float32",
        "--batch", str(tokens), "--backend", "loop,grouped", "--json", str(out_json), *FAST,
    )  # fmt: skip
    assert code == 0, err
    rows = json.loads(out_json.read_text())["results"]
    # the profile's input, made as runner.Row makes it (seed 0 + T tokens)
    x = torch.randn(tokens, c.spec.hidden_size, generator=torch.Generator().manual_seed(tokens))
    captured: list = []
    hook = c.model.get_submodule(c.family.router).register_forward_hook(lambda m, a, o: captured.append(o))
    with torch.no_grad():
        c.block(x[None])
    hook.remove()
    chosen = c.chosen(captured[0], tokens)
    expected = torch.bincount(chosen.flatten(), minlength=c.spec.num_experts).tolist()
    for row in rows:
        assert row["weights"] == f"layer {c.family.layer} of {c.folder}"
        assert row["counts"]["tokens_per_expert"] == expected
        assert row["accuracy"]["rel_error"] < 1e-5


@pytest.mark.parametrize(
    ("damage", "needle"), [("drop-expert", "not found"), ("reshape-router", "has shape")]
)
def test_a_bad_checkpoint_is_one_line(tmp_path, capsys, damage: str, needle: str) -> None:
    from safetensors.torch import load_file, save_file

    c = case("qwen2_moe")
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text((c.folder / "config.json").read_text())
    tensors = load_file(c.folder / "model.safetensors")
    router = "model.layers.1.mlp.gate.weight"
    if damage == "drop-expert":
        del tensors["model.layers.1.mlp.experts.3.up_proj.weight"]
    else:
        tensors[router] = tensors[router][:, :-1].contiguous()
    save_file(tensors, folder / "model.safetensors")
    code, _, err = _cli(capsys, "--weights", str(folder), "--layer", "1", "--dtype", "float32", *FAST)
    assert code == 2 and len(err.strip().splitlines()) == 1 and needle in err, err


def test_a_dense_layer_is_refused_naming_the_moe_layers(capsys) -> None:
    c = case("deepseek_v3")  # first_k_dense_replace=1: layer 0 is dense
    code, _, err = _cli(capsys, "--weights", str(c.folder), "--layer", "0", "--dtype", "float32", *FAST)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "--layer 0: not an MoE layer" in err and "its MoE layers are 1" in err
