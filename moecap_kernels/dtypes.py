"""Names of the dtypes we support, their torch types and their sizes in bytes."""

from __future__ import annotations

import torch

from moecap_kernels.errors import UserError

TORCH_DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
}
ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}


def canonical_dtype(name: str) -> str:
    """Return the canonical name for ``name`` (``bf16`` → ``bfloat16``) or raise UserError."""
    key = ALIASES.get(name.strip().lower(), name.strip().lower())
    if key not in TORCH_DTYPES:
        raise UserError(f"unsupported dtype {name!r}; choose one of {', '.join(TORCH_DTYPES)}")
    return key


# Dtypes a GEMM may run in, whose peak divides S-MFU: the activation dtypes, and int8 (w8a8).
COMPUTE_DTYPES = (*TORCH_DTYPES, "int8")


def canonical_compute_dtype(name: str) -> str:
    """``canonical_dtype``, or ``int8``: the dtypes a peak FLOP (or OP) rate is known for."""
    return "int8" if name.strip().lower() == "int8" else canonical_dtype(name)


def torch_dtype(name: str) -> torch.dtype:
    return TORCH_DTYPES[canonical_dtype(name)]


def dtype_bytes(name: str) -> int:
    """Bytes per element, an exact int."""
    return torch_dtype(name).itemsize
