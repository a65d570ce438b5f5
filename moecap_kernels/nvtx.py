"""NVTX ranges around the phases of a forward (router, dispatch, experts, combine); free on a CPU.

With the ``nvtx`` package installed the ranges go to the ``moecap`` domain, each phase its own
category (so nsys can filter and colour them: ``--nvtx-domain-include moecap``); otherwise to torch's
NVTX (the default domain).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from typing import Any

import torch

DOMAIN = "moecap"
CATEGORIES = ("router", "dispatch", "experts", "combine")


@cache
def nvtx_package() -> Any | None:
    """The ``nvtx`` package, when installed (it is optional)."""
    if importlib.util.find_spec("nvtx") is None:
        return None
    import nvtx

    return nvtx


@contextmanager
def nvtx_range(name: str, device: torch.device) -> Iterator[None]:
    """Mark ``name`` on the CUDA timeline (seen by nsys / ncu); a no-op elsewhere."""
    if device.type != "cuda":
        yield
        return
    package = nvtx_package()
    if package is not None:
        category = name if name in CATEGORIES else None
        package.push_range(message=name, domain=DOMAIN, category=category)
        try:
            yield
        finally:
            package.pop_range(domain=DOMAIN)
        return
    torch.cuda.nvtx.range_push(name)
    try:
        yield
    finally:
        torch.cuda.nvtx.range_pop()
