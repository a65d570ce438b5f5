"""The project's layer against the implementation users trust: for every supported family, Hugging
Face transformers' own model (tiny, random, saved with save_pretrained) is read back by the
project's config reader and checkpoint loader, and its MoE layer's output, expert choice and FLOPs
are compared with the project's on the same input, for every CPU backend (triton under the
interpreter). transformers is a test-only dependency, pinned in the ``test`` extra.
"""

from __future__ import annotations

import pytest
import torch

from moecap_kernels.backends import get_backend
from moecap_kernels.checkpoint import moe_layers, open_checkpoint
from moecap_kernels.counters import CountAccumulator
from moecap_kernels.metrics import work
from moecap_kernels.reference import reference_forward, relative_error
from moecap_kernels.routing import route_tokens
from tests.transformers_models import FAMILIES, TOKENS, case

transformers = pytest.importorskip("transformers")

BACKENDS = ("reference", "loop", "grouped", "cpu_fused", "triton")


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
