"""The kernel set compiled ahead of time for sm_90 and sm_80 without a GPU (CI's quick subset;
``python benchmarks/compile_check.py`` compiles the whole set): the launches the real launchers
make, as Triton's JIT would specialise them, each compiled and held to the limits."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from moecap_kernels.kernels.compile_check import (
    SHARED_LIMIT,
    Compiled,
    compile_launch,
    compiled_mode,
    kernel_set,
    layer_launches,
    nvidia_tools,
)
from moecap_kernels.kernels.configs import KernelConfig
from tests.helpers import tiny_spec

CONFIG = KernelConfig(16, 64, 64)


def test_launches_are_recorded_as_the_jit_specialises_them():
    spec = tiny_spec(hidden_size=48, intermediate_size=40, top_k=2)  # bf16
    gate_up, down = layer_launches(spec, 1, torch.bfloat16, CONFIG)
    assert (gate_up.kernel, down.kernel) == ("gate_up", "down")
    sig, constants = dict(gate_up.signature), dict(gate_up.constants)
    assert sig["x_ptr"] == "*bf16" and sig["h_ptr"] == "*bf16" and sig["counters_ptr"] == "*i64"
    assert sig["num_pairs"] == "i32" and "num_pairs" not in gate_up.divisible  # T·k = 2
    assert "hidden" in gate_up.divisible and "inter" not in gate_up.divisible  # 48 and 40
    assert constants["stride_xh"] == 1 and sig["stride_xh"] == "constexpr"  # unit strides become constants
    assert constants["BLOCK_M"] == 16 and constants["TOP_K"] == 2 and constants["COUNT"] is False
    assert "x_ptr" in gate_up.divisible
    assert dict(down.signature)["out_ptr"] == "*fp32" and dict(down.constants)["ATOMIC"] is True


def test_shared_experts_w8a8_and_the_fixed_order_combine_add_their_launches():
    spec = tiny_spec(hidden_size=64, intermediate_size=32, num_shared_experts=1, shared_intermediate_size=48)
    kernels = [launch.kernel for launch in layer_launches(spec, 4, torch.bfloat16, CONFIG, atomic=False)]
    assert kernels == ["gate_up", "down", "gate_up", "down", "combine"]
    w8a8 = tiny_spec(hidden_size=64, intermediate_size=32).with_format("w8a8")
    kernels = [launch.kernel for launch in layer_launches(w8a8, 4, torch.bfloat16, CONFIG)]
    assert kernels == ["quantize_rows", "gate_up", "quantize_rows", "down"]


def test_the_limits():
    launch = layer_launches(tiny_spec(), 1, torch.bfloat16, CONFIG)[0]
    fine = Compiled(launch, 90, 1000, 100, 0)
    assert fine.problems == []
    assert "limit" in dataclasses.replace(fine, shared_bytes=SHARED_LIMIT[90] + 1).problems[0]
    assert "spills 64 B" in dataclasses.replace(fine, spill_bytes=64).problems[0]
    assert dataclasses.replace(fine, arch=80, spill_bytes=64).problems == []  # reported, not failed
    assert dataclasses.replace(fine, error="ptxas fatal").problems == ["does not compile: ptxas fatal"]


QUICK_MODELS = ("mixtral-8x7b", "qwen3-30b-a3b", "deepseek-v3")


@pytest.mark.parametrize("arch", [90, 80])
def test_the_quick_kernel_set_compiles_within_the_limits(arch):
    pytest.importorskip("triton.backends.nvidia", reason="this triton has no NVIDIA backend")
    if nvidia_tools() is None:
        pytest.skip("this triton bundles no cuobjdump to read spills with")
    launches = kernel_set(QUICK_MODELS, (1, 64, 4096), arch, formats=("none", "int4-g128"))
    assert len(launches) >= 20
    with compiled_mode():
        results = [compile_launch(launch, arch) for launch in launches]
    failures = [f"{r.launch.label}: {'; '.join(r.problems)}" for r in results if r.problems]
    assert failures == []
    spills = [f"{r.launch.label}: {r.spill_bytes} B" for r in results if r.spill_bytes]
    assert spills == []  # on sm_80 too: its heuristic takes a tile that does not spill
    assert all(r.shared_bytes and r.registers for r in results)
