"""The kernel set compiled ahead of time for NVIDIA GPUs, on a machine without one.

What a GPU will compile is found by running the real launchers (``ops.launch_gate_up`` /
``launch_down`` / ``launch_quantize_rows`` / ``launch_combine``) on meta tensors of the layer's true
shapes, with each Triton kernel replaced by a recorder: the arguments and launch options it would
have received become the signature Triton's JIT would specialise (pointers and multiples of 16 marked
16-divisible, integers equal to 1 made constants, as the JIT does). Each distinct kernel is then
compiled by Triton's own compiler for ``GPUTarget("cuda", arch, 32)`` and checked:

- it compiles (no error in any lowering, nor in Triton's bundled ptxas);
- its shared memory fits the target's per-block limit (``SHARED_LIMIT``);
- it spills no registers on sm_90 (a spill shows as a local-memory stack frame in the cubin,
  read with Triton's bundled ``cuobjdump``); spills on sm_80 are reported.

``python benchmarks/compile_check.py`` compiles the full set; ``tests/test_compile_check.py`` a
subset in CI.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from moecap_kernels.errors import UserError
from moecap_kernels.spec import MoESpec

# Largest dynamic shared memory one block may use: H100/H200 227 KiB, A100 163 KiB.
SHARED_LIMIT = {90: 227 * 1024, 80: 163 * 1024}
TRITON_DTYPES = {
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
    torch.float32: "fp32",
    torch.int32: "i32",
    torch.int64: "i64",
    torch.int8: "i8",
    torch.uint8: "u8",
}
META = torch.device("meta")
KERNEL_NAMES = ("gate_up_kernel", "down_kernel", "quantize_rows_kernel", "combine_kernel")


@dataclass(frozen=True)
class Launch:
    """One kernel as the GPU would compile it: its signature, constants, attributes and options."""

    kernel: str
    signature: tuple[tuple[str, str], ...]
    constants: tuple[tuple[str, Any], ...]
    divisible: tuple[str, ...]  # arguments marked 16-divisible
    num_warps: int
    num_stages: int
    where: tuple[str, ...] = field(default=(), compare=False)  # the layers and T that launch it
    lazy: Any = field(default=None, compare=False, repr=False)  # the lazy_jit kernel itself

    @property
    def label(self) -> str:
        c = dict(self.constants)
        blocks = "×".join(str(c[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K") if k in c)
        flags = [k.lower() for k in ("COUNT", "ATOMIC", "GATED") if c.get(k)]
        dtypes = "/".join(
            sorted({t.lstrip("*") for _, t in self.signature if t.startswith("*")} - {"i32", "i64"})
        )
        parts = [self.kernel, blocks, f"w{self.num_warps}s{self.num_stages}", dtypes, *flags]
        if c.get("CODES"):
            parts.append(f"codes{c['CODES']}g{c.get('GROUP', 0)}")
        return " ".join(p for p in parts if p)


class _Recorder:
    """Stands in for a lazy Triton kernel: ``kernel[grid](*args, **kwargs)`` records the call."""

    def __init__(self, name: str, kernel: Any, calls: list) -> None:
        self.name, self.kernel, self.calls = name, kernel, calls

    def __getitem__(self, grid: Any) -> Any:
        def launch(*args: Any, **kwargs: Any) -> None:
            self.calls.append((self.name, self.kernel, args, kwargs))

        return launch


@contextlib.contextmanager
def recording() -> Iterator[list]:
    """Every kernel launch of ``kernels.ops`` recorded (not run) while inside."""
    from moecap_kernels.kernels import ops

    calls: list = []
    saved = {name: getattr(ops, name) for name in KERNEL_NAMES}
    try:
        for name, kernel in saved.items():
            setattr(ops, name, _Recorder(name.removesuffix("_kernel"), kernel, calls))
        yield calls
    finally:
        for name, kernel in saved.items():
            setattr(ops, name, kernel)


def _specialise(name: str, kernel: Any, args: tuple, kwargs: dict, where: str) -> Launch:
    """The signature Triton's JIT gives this call (see the module docstring)."""
    fn = kernel.jitted()
    kwargs = dict(kwargs)
    num_warps, num_stages = kwargs.pop("num_warps", 4), kwargs.pop("num_stages", 3)
    bound = dict(zip(fn.arg_names, args, strict=False)) | kwargs
    signature, constants, divisible = [], [], []
    for arg in fn.arg_names:
        value = bound.get(arg)
        if arg in kwargs:
            constants.append((arg, value))
            signature.append((arg, "constexpr"))
        elif isinstance(value, torch.Tensor):
            signature.append((arg, "*" + TRITON_DTYPES[value.dtype]))
            divisible.append(arg)
        elif isinstance(value, bool) or value is None:
            constants.append((arg, value))
            signature.append((arg, "constexpr"))
        elif isinstance(value, int):
            if value == 1:
                constants.append((arg, 1))
                signature.append((arg, "constexpr"))
            else:
                signature.append((arg, "i32" if -(2**31) <= value < 2**31 else "i64"))
                if value % 16 == 0:
                    divisible.append(arg)
        elif isinstance(value, float):
            signature.append((arg, "fp32"))
        else:
            raise TypeError(f"{name}: argument {arg} of type {type(value).__name__} is not modelled")
    return Launch(
        name, tuple(signature), tuple(constants), tuple(divisible), num_warps, num_stages, (where,), kernel
    )


def _meta(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device=META)


def layer_launches(
    spec: MoESpec,
    tokens: int,
    dtype: torch.dtype,
    config: Any,
    *,
    count: bool = False,
    atomic: bool = True,
) -> list[Launch]:
    """The kernels one forward of ``spec`` at ``tokens`` tokens launches with ``config``, as
    ``ops.fused_experts`` launches them: routed experts (and the shared experts' second pair), in
    ``spec``'s weight format, then the fixed-order combine unless ``atomic``; from meta tensors."""
    from moecap_kernels.kernels import ops
    from moecap_kernels.kernels.align import max_padded_rows

    fmt, k, hidden, cfg = spec.fmt, spec.top_k, spec.hidden_size, config.as_list()
    counters = _meta(3, dtype=torch.int64)
    groups = [(spec.num_experts, spec.intermediate_size, k)]
    if spec.num_shared_experts:
        groups.append((spec.num_shared_experts, spec.shared_intermediate_size, spec.num_shared_experts))
    with recording() as calls:
        for experts, inter, per_token in groups:
            pairs = tokens * per_token
            weights = _meta(tokens, per_token, dtype=torch.float32)
            padded = max_padded_rows(pairs, experts, config.block_m)
            layout = (
                _meta(padded, dtype=torch.int32),
                _meta(padded // config.block_m, dtype=torch.int32),
                _meta(1, dtype=torch.int32),
            )
            x, x_scales, h_scales = _meta(tokens, hidden, dtype=dtype), None, None
            (w_in, s_in, z_in), (w_out, s_out, z_out) = _weights(spec, experts, inter)
            if fmt.int8_activations:  # x quantized per token first
                codes, x_scales = _meta(tokens, hidden, dtype=torch.int8), _meta(tokens, dtype=torch.float32)
                ops.launch_quantize_rows(x, codes, x_scales, None, 0)
                x = codes
            h = _meta(padded, inter, dtype=ops._h_dtype(x))
            ops.launch_gate_up(
                x, w_in, h, *layout, counters, per_token, spec.gated, spec.activation, cfg, count,
                fmt=fmt, scales=s_in, zeros=z_in, x_scales=x_scales,
            )  # fmt: skip
            if fmt.int8_activations:  # and each pair's act(gate)·up row
                codes, h_scales = _meta(padded, inter, dtype=torch.int8), _meta(padded, dtype=torch.float32)
                ops.launch_quantize_rows(h, codes, h_scales, layout[0], pairs)
                h = codes
            out = _meta(tokens if atomic else pairs, hidden, dtype=torch.float32)
            ops.launch_down(
                h, w_out, out, *layout, weights, counters, cfg, atomic, count,
                fmt=fmt, scales=s_out, zeros=z_out, h_scales=h_scales,
            )  # fmt: skip
        if not atomic:
            shared = _meta(tokens * spec.num_shared_experts, hidden, dtype=torch.float32)
            routed, y = _meta(tokens * k, hidden, dtype=torch.float32), _meta(tokens, hidden, dtype=dtype)
            ops.launch_combine(routed, shared, y, k, spec.num_shared_experts)
    where = f"{spec.name} {spec.weight_format} T={tokens}"
    return [_specialise(name, kernel, args, kwargs, where) for name, kernel, args, kwargs in calls]


def _weights(spec: MoESpec, experts: int, inter: int) -> tuple[tuple, tuple]:
    """(w_in, w_out), each (codes or dense weights, scales, zero points) as meta tensors."""
    from moecap_kernels.dtypes import torch_dtype
    from moecap_kernels.kernels.ops import SCALE_TORCH

    h, fmt = spec.hidden_size, spec.fmt
    in_rows = (2 if spec.gated else 1) * inter
    shapes = ((in_rows, h, inter), (h, inter, h))
    if not fmt.quantized:
        dtype = torch_dtype(spec.weight_dtype)
        return tuple((_meta(experts, r, c, dtype=dtype), None, None) for r, c, _ in shapes)
    codes = torch.int8 if fmt.codes == "int8" else torch.uint8
    out = []
    for rows, cols, projection in shapes:
        groups = math.ceil(cols / fmt.group(cols))
        w = _meta(experts, rows, cols * fmt.weight_bits // 8, dtype=codes)
        scales = _meta(experts, fmt.row_blocks(rows, projection), groups, dtype=SCALE_TORCH[fmt.scale_dtype])
        zeros = _meta(experts, rows, (groups + 1) // 2, dtype=torch.uint8) if fmt.zero_points else None
        out.append((w, scales, zeros))
    return tuple(out)


def distinct(launches: Sequence[Launch]) -> list[Launch]:
    """One launch per compiled kernel, with every place that launches it."""
    merged: dict[Launch, Launch] = {}
    for launch in launches:
        seen = merged.get(launch)
        where = launch.where if seen is None else tuple(dict.fromkeys(seen.where + launch.where))
        merged[launch] = dataclasses.replace(seen or launch, where=where)
    return list(merged.values())


# --- compiling -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Compiled:
    launch: Launch
    arch: int
    shared_bytes: int | None
    registers: int | None
    spill_bytes: int | None  # the local-memory stack frame (0: no spill)
    error: str = ""

    @property
    def problems(self) -> list[str]:
        """What fails the check: an error, shared memory past the limit, spills on sm_90."""
        if self.error:
            return [f"does not compile: {self.error}"]
        found = []
        if self.shared_bytes is not None and self.shared_bytes > SHARED_LIMIT[self.arch]:
            found.append(
                f"shared memory {self.shared_bytes} B > the sm_{self.arch} limit {SHARED_LIMIT[self.arch]} B"
            )
        if self.arch >= 90 and self.spill_bytes:
            found.append(f"spills {self.spill_bytes} B to local memory on sm_{self.arch}")
        return found


def nvidia_tools() -> Path | None:
    """Triton's bundled NVIDIA binaries (ptxas, cuobjdump), or None."""
    import triton

    folder = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    return folder if (folder / "cuobjdump").exists() else None


def resource_usage(cubin: bytes) -> tuple[int | None, int | None]:
    """(registers, stack bytes) of the cubin's kernel, by the bundled cuobjdump; (None, None) if absent."""
    tools = nvidia_tools()
    if tools is None:
        return None, None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
        handle.write(cubin)
        handle.flush()
        text = subprocess.run([str(tools / "cuobjdump"), "--dump-resource-usage", handle.name],
                              capture_output=True, text=True, check=False).stdout  # fmt: skip
    regs = re.search(r"REG:(\d+)", text)
    stack = re.search(r"STACK:(\d+)", text)
    return (int(regs[1]) if regs else None), (int(stack[1]) if stack else None)


def compile_launch(launch: Launch, arch: int) -> Compiled:
    """``launch`` compiled for sm_``arch`` by Triton; the interpreter must be off."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = launch.lazy.jitted()
    signature = dict(launch.signature)
    constants = dict(launch.constants)
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in launch.divisible}
    try:
        compiled = triton.compile(
            ASTSource(fn, signature, constants, attrs),
            target=GPUTarget("cuda", arch, 32),
            options={"num_warps": launch.num_warps, "num_stages": launch.num_stages},
        )
    except Exception as exc:  # any lowering or ptxas failure is the finding itself
        lines = [line for line in str(exc).splitlines() if line.strip()]
        return Compiled(
            launch, arch, None, None, None, error=(lines[-1] if lines else type(exc).__name__)[:300]
        )
    registers, stack = resource_usage(compiled.asm["cubin"])
    return Compiled(launch, arch, int(compiled.metadata.shared), registers, stack)


@contextlib.contextmanager
def compiled_mode() -> Iterator[None]:
    """TRITON_INTERPRET off while compiling (the tests run with it on), and Triton's FP fusion
    default said explicitly (as it is on a GPU: enabled; Triton 3.9 warns when it is unset)."""
    saved = {name: os.environ.get(name) for name in ("TRITON_INTERPRET", "TRITON_DEFAULT_FP_FUSION")}
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


# --- the kernel set ------------------------------------------------------------------------------

DEVICE_NAMES = {90: "NVIDIA_H200", 80: "NVIDIA_A100-SXM4-80GB"}  # tuned files looked up for each target


def kernel_set(
    models: Sequence[str],
    tokens: Sequence[int],
    arch: int,
    *,
    dtypes: Sequence[str] = ("bfloat16",),
    formats: Sequence[str] | None = None,
    counts: Sequence[bool] = (False,),
    atomics: Sequence[bool] = (True,),
) -> list[Launch]:
    """Every distinct kernel the triton backend launches for these presets, T values, dtypes, weight
    formats (default: none and the preset's own), with the counters on/off and either combine, with
    the configs it would choose on sm_``arch`` (tuned file, else the heuristic)."""
    from moecap_kernels.backends.triton import TritonBackend
    from moecap_kernels.dtypes import torch_dtype
    from moecap_kernels.kernels.configs import config_for
    from moecap_kernels.spec import load_preset

    launches: list[Launch] = []
    backend = TritonBackend()
    for model in models:
        base = load_preset(model)
        for dtype_name in dtypes:
            for fmt_name in dict.fromkeys(formats or ("none", base.weight_format)):
                try:
                    spec = base.with_dtype(dtype_name).with_format(fmt_name)
                except UserError:  # the format's groups do not divide this layer: never launched
                    continue
                if backend.supports(spec) is not None:
                    continue
                dtype = torch_dtype(dtype_name)
                fmt = spec.fmt if spec.fmt.quantized else None
                for t in tokens:
                    shape = (t, spec.num_experts, spec.top_k, spec.hidden_size, spec.intermediate_size)
                    config = config_for(
                        *shape, dtype, DEVICE_NAMES[arch], arch, spec.gated, weight_format=fmt
                    )
                    for count in counts:
                        for atomic in atomics:
                            launches += layer_launches(spec, t, dtype, config, count=count, atomic=atomic)
    return distinct(launches)
