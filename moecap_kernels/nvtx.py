"""NVTX ranges around the phases of a forward (router, dispatch, experts, combine); free on a CPU."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def nvtx_range(name: str, device: torch.device) -> Iterator[None]:
    """Mark ``name`` on the CUDA timeline (seen by nsys / ncu); a no-op elsewhere."""
    if device.type != "cuda":
        yield
        return
    torch.cuda.nvtx.range_push(name)
    try:
        yield
    finally:
        torch.cuda.nvtx.range_pop()
