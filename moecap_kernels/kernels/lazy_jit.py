"""Triton kernels jitted at their first launch rather than at import.

``triton.jit`` decides at decoration time whether a kernel is compiled or interpreted
(TRITON_INTERPRET=1). Deciding at launch time instead means importing this package early (a
test collection, a registry scan) can never freeze the wrong mode. This holds only for kernels
that call Triton builtins alone: ``triton.language``'s jitted helpers (``tl.cdiv``, ``tl.sum``,
``tl.sigmoid``, ``tl.zeros``...) are frozen when triton is first imported, which torch itself
may do early (``torch.utils.flop_counter`` imports triton).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import triton


def interpreting() -> bool:
    """Whether TRITON_INTERPRET asks for the interpreter, read as Triton reads it (1/true/on, any case)."""
    return os.environ.get("TRITON_INTERPRET", "").lower() in ("1", "true", "on")


class LazyKernel:
    """Wraps a plain kernel function; ``kernel[grid](...)`` jits it for the current mode, once."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self._jitted: dict[bool, Any] = {}

    def jitted(self) -> Any:
        mode = interpreting()
        if mode not in self._jitted:
            self._jitted[mode] = triton.jit(self.fn)
        return self._jitted[mode]

    def __getitem__(self, grid: Any) -> Callable[..., Any]:
        return self.jitted()[grid]


def lazy_jit(fn: Callable[..., Any]) -> LazyKernel:
    """Decorator: like ``triton.jit`` but resolved on first launch (see the module docstring)."""
    return LazyKernel(fn)
