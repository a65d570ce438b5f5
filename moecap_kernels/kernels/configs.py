"""Block sizes for the grouped GEMM kernels: tuned JSON files when present, else a heuristic.

Tuned files live in ``moecap_kernels/configs/`` and are named
``E={num_experts},N={intermediate_size},device_name={device},dtype={dtype}.json``; each maps a
token count M (as a string) to ``{"block_m", "block_n", "block_k", "group_m", "num_warps",
"num_stages"}``. The entry whose M is nearest the layer's token count is used. Without a file the
heuristic below (aimed at Hopper: H100/H200) is used, and :attr:`KernelConfig.source` says so.
Quantized experts look for files whose name ends in ``,weight_format={name}`` (a dense table is
never applied to them), and every config is then fitted to the format (:func:`for_format`:
group-wise scales need ``BLOCK_K`` to divide the group).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path

import torch

from moecap_kernels.errors import UserError
from moecap_kernels.quant.formats import WeightFormat

CONFIG_KEYS = ("block_m", "block_n", "block_k", "group_m", "num_warps", "num_stages")
# Shared memory a pipelined stage may use (H100/H200 allow 227 KiB per block, A100 163 KiB; keep
# some headroom).
SMEM_BUDGET_BYTES = 200 * 1024
AMPERE_SMEM_BUDGET_BYTES = 144 * 1024
# Where tuned tables ship and where load_tuned looks by default (benchmarks/tune_triton.py writes there).
CONFIG_FOLDER = Path(__file__).resolve().parent.parent / "configs"


@dataclass(frozen=True)
class KernelConfig:
    """Launch parameters shared by the gate/up and down kernels of one forward."""

    block_m: int
    block_n: int
    block_k: int
    group_m: int = 1
    num_warps: int = 4
    num_stages: int = 3
    source: str = "explicit"

    def __post_init__(self) -> None:
        for key in ("block_m", "block_n", "block_k"):
            value = getattr(self, key)
            if value < 16 or value & (value - 1):
                raise UserError(f"kernel config: {key} must be a power of two >= 16, got {value}")
        if self.group_m < 1 or self.num_warps < 1 or self.num_stages < 1:
            raise UserError(f"kernel config: group_m, num_warps, num_stages must be >= 1: {self}")

    def as_list(self) -> list[int]:
        """The six launch integers, in CONFIG_KEYS order (the custom ops take them as an int list)."""
        return [getattr(self, key) for key in CONFIG_KEYS]


def _tiles(replacements: dict[tuple[int, ...], tuple[int, ...]]) -> dict[KernelConfig, KernelConfig]:
    """{config: its replacement}, each written as (block_m, block_n, block_k, group_m, warps, stages)."""
    return {KernelConfig(*old): KernelConfig(*new) for old, new in replacements.items()}


# Replacements of the Hopper heuristic's tiles found by python benchmarks/compile_check.py (and kept
# so by tests/test_compile_check.py). On Ampere, dense tiles that spill registers on sm_80:
AMPERE = _tiles(
    {(128, 128, 64, 8, 8, 3): (128, 64, 64, 8, 8, 3), (64, 128, 64, 8, 4, 4): (64, 128, 64, 8, 8, 3)}
)
# Gated experts dequantized in the K loop: tiles that spill no register on sm_90 …
QUANTIZED_GATED = _tiles({
    (32, 64, 128, 1, 4, 4): (32, 32, 64, 1, 4, 4),
    (64, 64, 128, 1, 4, 4): (64, 128, 64, 1, 8, 4),
    (64, 128, 64, 8, 4, 4): (64, 128, 64, 8, 8, 4),
    (128, 128, 64, 8, 8, 3): (128, 64, 32, 8, 8, 4),
})  # fmt: skip
# … and on sm_80, where some of those (and the 16-row decode tile) still spill a few bytes.
AMPERE_QUANTIZED_GATED = _tiles({
    (16, 64, 128, 1, 4, 4): (16, 64, 64, 1, 4, 4),
    (64, 64, 128, 1, 4, 4): (64, 128, 32, 1, 8, 3),
    (64, 128, 64, 8, 4, 4): (64, 128, 32, 8, 8, 3),
    (128, 128, 64, 8, 8, 3): (64, 128, 32, 8, 8, 3),
})  # fmt: skip


def config_file_name(
    num_experts: int, intermediate_size: int, device_name: str, dtype: str, weight_format: str = "none"
) -> str:
    """The tuned table's file name; ``dtype`` is the activations', ``weight_format`` the experts'."""
    quantized = "" if weight_format == "none" else f",weight_format={weight_format}"
    return f"E={num_experts},N={intermediate_size},device_name={device_name},dtype={dtype}{quantized}.json"


def device_name(device: torch.device) -> str:
    """The name used in tuned-config file names: ``NVIDIA_H200``, or ``cpu``."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device).replace(" ", "_")
    return device.type


def _parse_table(text: str, file_name: str) -> dict[int, KernelConfig]:
    try:
        data = json.loads(text)
        return {
            int(m): KernelConfig(
                **{key: int(entry[key]) for key in CONFIG_KEYS}, source=f"tuned: {file_name} (M={m})"
            )
            for m, entry in data.items()
        }
    except (json.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError) as exc:
        raise UserError(
            f'tuned config {file_name}: malformed ({exc}); expected {{"M": {{{", ".join(CONFIG_KEYS)}}}}}'
        ) from None


@cache
def load_tuned(file_name: str, folder: str | None = None) -> dict[int, KernelConfig] | None:
    """The tuned table ``folder/file_name`` (default: ``CONFIG_FOLDER``), or None if absent."""
    base = CONFIG_FOLDER if folder is None else Path(folder)
    path = base / file_name
    if not path.is_file():
        return None
    return _parse_table(path.read_text(), file_name) or None


def _pow2_at_least_16(n: int) -> int:
    return max(16, 1 << max(0, n - 1).bit_length())


def decode_block_m(rows_per_expert: float) -> int:
    """The M-block that holds all of an expert's rows at decode sizes, so that each activated expert's
    weights are read by one M-block (load amplification 1.0): the smallest power of two, from 16 to
    64, at or above ``r + 4·√r``, r the mean rows per expert. Under uniform routing an expert's rows
    are binomial with mean r and variance below r: four standard deviations leave about one expert in
    30,000 with a second M-block."""
    bound = rows_per_expert + 4 * math.sqrt(rows_per_expert)
    return min(64, _pow2_at_least_16(math.ceil(bound)))


def heuristic_config(
    num_tokens: int,
    num_experts: int,
    top_k: int,
    hidden_size: int,
    intermediate_size: int,
    elem_bytes: int,
    gated: bool = True,
    arch: int = 90,
    quantized: bool = False,
) -> KernelConfig:
    """Block sizes from the expected rows per expert r = T·k/E, the shape, the GPU (``arch``:
    compute capability × 10, 90 for Hopper) and whether the kernels dequantize their weights.

    Decode (r ≤ 48) is weight-bandwidth bound: the M-block is sized to hold an expert's rows
    (``decode_block_m``), so no expert's weights are read twice, and wide K tiles stream them in
    long bursts; its padding costs FLOPs the memory-bound layer has to spare. Prefill is compute
    bound: 64- or 128-row blocks reuse each weight tile across more rows (wgmma wants M ≥ 64). On
    Ampere (arch < 90) the 128-row gated tile of 128 columns spills registers (compile-checked:
    ``kernels/compile_check.py``): it takes 64 columns there instead. Gated experts dequantized in
    the K loop hold more registers per tile: ``QUANTIZED_GATED`` (and on sm_80
    ``AMPERE_QUANTIZED_GATED``) give them tiles that spill nothing.
    """
    rows_per_expert = num_tokens * top_k / num_experts
    if rows_per_expert <= 48:
        block_m = decode_block_m(rows_per_expert)
        cfg = {
            16: KernelConfig(16, 64, 128, group_m=1, num_warps=4, num_stages=4),
            32: KernelConfig(32, 64, 128, group_m=1, num_warps=4, num_stages=4),
            64: KernelConfig(64, 64, 128, group_m=1, num_warps=4, num_stages=4),
        }[block_m]
    elif rows_per_expert <= 256:
        cfg = KernelConfig(64, 128, 64, group_m=8, num_warps=4, num_stages=4)
    else:
        cfg = KernelConfig(128, 128, 64, group_m=8, num_warps=8, num_stages=3)
    if quantized and gated:
        ampere = AMPERE_QUANTIZED_GATED.get(cfg) if arch < 90 else None
        cfg = ampere or QUANTIZED_GATED.get(cfg, cfg)
    elif arch < 90:
        cfg = AMPERE.get(cfg, cfg)
    if elem_bytes >= 4:
        cfg = replace(cfg, block_k=max(16, cfg.block_k // 2))
    # Never tile past the (power-of-two rounded) problem: small layers would only mask work away.
    widest_n = max(intermediate_size, hidden_size)
    cfg = replace(
        cfg,
        block_n=min(cfg.block_n, _pow2_at_least_16(widest_n)),
        block_k=min(cfg.block_k, _pow2_at_least_16(min(intermediate_size, hidden_size))),
    )
    weight_tiles = 2 if gated else 1
    stage_bytes = (cfg.block_m * cfg.block_k + weight_tiles * cfg.block_k * cfg.block_n) * elem_bytes
    budget = SMEM_BUDGET_BYTES if arch >= 90 else AMPERE_SMEM_BUDGET_BYTES
    stages = max(2, min(cfg.num_stages, budget // stage_bytes))
    return replace(cfg, num_stages=stages, source="heuristic" if arch >= 90 else f"heuristic (sm_{arch})")


def cuda_arch(device: torch.device) -> int:
    """Compute capability × 10 of a CUDA device (90 for H100/H200); 90 elsewhere (the interpreter)."""
    if device.type != "cuda":
        return 90
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def get_config(
    num_tokens: int,
    num_experts: int,
    top_k: int,
    hidden_size: int,
    intermediate_size: int,
    dtype: torch.dtype,
    device: torch.device,
    gated: bool = True,
    folder: str | None = None,
    weight_format: WeightFormat | None = None,
) -> KernelConfig:
    """The tuned config nearest ``num_tokens`` if a file matches, else the heuristic (``source``
    says), fitted to ``weight_format`` (quantized experts; ``dtype`` is then the activations')."""
    shape = (num_tokens, num_experts, top_k, hidden_size, intermediate_size)
    return config_for(*shape, dtype, device_name(device), cuda_arch(device), gated, folder, weight_format)


def config_for(
    num_tokens: int,
    num_experts: int,
    top_k: int,
    hidden_size: int,
    intermediate_size: int,
    dtype: torch.dtype,
    device: str,
    arch: int,
    gated: bool = True,
    folder: str | None = None,
    weight_format: WeightFormat | None = None,
) -> KernelConfig:
    """``get_config`` for a device named ``device`` (as in tuned file names) of compute capability
    ``arch``, which need not be present (the compile check asks for GPUs it does not have)."""
    dtype_name = str(dtype).removeprefix("torch.")
    fmt_name = "none" if weight_format is None else weight_format.name
    name = config_file_name(num_experts, intermediate_size, device, dtype_name, fmt_name)
    table = load_tuned(name, folder)
    if table:
        cfg = table[min(table, key=lambda m: (abs(m - num_tokens), m))]
    else:
        elem_bytes = torch.empty((), dtype=dtype).element_size()
        shape = (num_tokens, num_experts, top_k, hidden_size, intermediate_size)
        cfg = heuristic_config(*shape, elem_bytes, gated, arch, quantized=weight_format is not None)
        cfg = replace(cfg, source=f"{cfg.source} (no tuned file {name})")
    return cfg if weight_format is None else for_format(cfg, weight_format)


def format_block_k(fmt: WeightFormat, block_k: int) -> int:
    """The BLOCK_K the kernels run ``fmt`` at, from ``block_k``: unchanged without group-wise scales,
    else the largest power of two that divides the group and is at most ``block_k`` (a K step then
    stays within one group). A UserError when that is below 16, the least K of a dot product."""
    if not fmt.quantized or not fmt.group_size:
        return block_k
    fitted = min(block_k, fmt.group_size & -fmt.group_size)  # the group's largest power-of-two divisor
    if fitted < 16:
        raise UserError(
            f"{fmt.name}: the Triton kernels need groups that are multiples of 16 weights along K "
            f"(a K step of at least 16 within one group), not {fmt.group_size}"
        )
    return fitted


def for_format(cfg: KernelConfig, fmt: WeightFormat) -> KernelConfig:
    """``cfg`` with the BLOCK_K that ``fmt``'s groups allow (:func:`format_block_k`), saying so in
    ``source`` when it changed."""
    block_k = format_block_k(fmt, cfg.block_k)
    if block_k == cfg.block_k:
        return cfg
    return replace(cfg, block_k=block_k, source=f"{cfg.source}; block_k {block_k} for {fmt.name}'s groups")
