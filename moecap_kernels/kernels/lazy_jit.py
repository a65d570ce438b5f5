"""Triton kernels jitted at their first launch rather than at import.

``triton.jit`` decides at decoration time whether a kernel is compiled or interpreted
(TRITON_INTERPRET=1). Deciding at launch time instead means importing this package early (a
test collection, a registry scan) can never freeze the wrong mode. This holds only for kernels
that call Triton builtins alone: ``triton.language``'s jitted helpers (``tl.cdiv``, ``tl.sum``,
``tl.sigmoid``, ``tl.zeros``...) are frozen when triton is first imported, which torch itself
may do early (``torch.utils.flop_counter`` imports triton).

Device helpers of our own are ``lazy_jit`` functions too: when a kernel is jitted, every global
name it uses that holds a :class:`LazyKernel` is bound, in a copy of the kernel's globals, to that
helper jitted in the same mode (recursively), so kernels and their helpers never mix modes.
"""

from __future__ import annotations

import os
import types
from collections.abc import Callable
from typing import Any

import triton


def interpreting() -> bool:
    """Whether TRITON_INTERPRET asks for the interpreter, read as Triton reads it (1/true/on, any case)."""
    return os.environ.get("TRITON_INTERPRET", "").lower() in ("1", "true", "on")


class LazyKernel:
    """Wraps a plain kernel (or device helper) function; ``kernel[grid](...)`` jits it for the
    current mode, once, with its ``lazy_jit`` helpers jitted in that mode too."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self._jitted: dict[bool, Any] = {}

    def jitted(self) -> Any:
        mode = interpreting()
        if mode not in self._jitted:
            self._jitted[mode] = triton.jit(_with_helpers_jitted(self.fn))
        return self._jitted[mode]

    def __getitem__(self, grid: Any) -> Callable[..., Any]:
        return self.jitted()[grid]


def _with_helpers_jitted(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` itself when it calls no lazy helper, else a copy of it whose globals map each helper's
    name to the helper jitted in the current mode (the module's own globals are left alone)."""
    scope = fn.__globals__
    helpers = {name: scope[name] for name in fn.__code__.co_names if isinstance(scope.get(name), LazyKernel)}
    if not helpers:
        return fn
    rebound = {**scope, **{name: helper.jitted() for name, helper in helpers.items()}}
    copy = types.FunctionType(fn.__code__, rebound, fn.__name__, fn.__defaults__, fn.__closure__)
    for attribute in ("__kwdefaults__", "__annotations__", "__qualname__", "__module__", "__doc__"):
        setattr(copy, attribute, getattr(fn, attribute))  # annotations: which parameters are constexpr
    return copy


def lazy_jit(fn: Callable[..., Any]) -> LazyKernel:
    """Decorator: like ``triton.jit`` but resolved on first launch (see the module docstring)."""
    return LazyKernel(fn)
