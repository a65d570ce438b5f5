"""Compile a Triton kernel ahead of time for an NVIDIA target (sm_90 Hopper, sm_80 Ampere) without a
GPU, with Triton's bundled ptxas: the tests' check that the kernels build as the GPU will build them."""

from __future__ import annotations

import re

import pytest

LAYOUT_POINTERS = {
    "pair_ids_ptr": "*i32",
    "block_expert_ptr": "*i32",
    "num_padded_ptr": "*i32",
    "counters_ptr": "*i64",
}
DENSE_CONSTEXPRS = dict(CODES=0, GROUP=0, ROW_BLOCK=1, ZERO_POINTS=False, INT8_ACT=False)


def compile_ptx(
    kernel,
    pointers: dict[str, str],
    constexprs: dict,
    unit_strides: tuple[str, ...],
    num_warps: int,
    num_stages: int,
    arch: int = 90,
) -> str:
    """The PTX of ``kernel`` (a ``lazy_jit`` kernel) compiled to a cubin for ``sm_{arch}``; arguments
    not named in ``pointers`` or ``constexprs`` are int32. TRITON_INTERPRET must be unset."""
    import triton

    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError:
        pytest.skip("this triton has no ASTSource/GPUTarget")
    if "nvidia" not in getattr(triton.backends, "backends", {}):
        pytest.skip("this triton has no NVIDIA backend")
    fn = kernel.jitted()  # compiled mode, its lazy_jit helpers jitted alike
    constexprs = {**constexprs, **dict.fromkeys(unit_strides, 1)}  # as the launcher specialises them
    signature = {
        name: "constexpr" if name in constexprs else pointers.get(name, "i32") for name in fn.arg_names
    }
    try:
        source = ASTSource(fn, signature, constexprs)
    except TypeError:
        pytest.skip("this triton's ASTSource takes other arguments")
    compiled = triton.compile(
        source, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps, "num_stages": num_stages}
    )
    return compiled.asm["ptx"]


def has_atomics(ptx: str) -> bool:
    return re.search(r"^\s*(@%p\d+\s+)?(atom|red)\.", ptx, re.MULTILINE) is not None
