"""Backends registered by name: ``get_backend("grouped")``, ``backend_names()``."""

from __future__ import annotations

from collections.abc import Callable

from moecap_kernels.backends.base import Backend
from moecap_kernels.errors import UserError

_REGISTRY: dict[str, Callable[[], Backend]] = {}


def register(name: str) -> Callable[[type[Backend]], type[Backend]]:
    """Class decorator: make a Backend available under ``name``."""

    def wrap(cls: type[Backend]) -> type[Backend]:
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def _load_builtin() -> None:
    # Imported for their @register side effect; each module is one backend.
    from moecap_kernels.backends import dequant, grouped, loop  # noqa: F401

    for optional in ("triton", "cpu_fused"):
        try:
            __import__(f"moecap_kernels.backends.{optional}")
        except ModuleNotFoundError as exc:
            if exc.name != f"moecap_kernels.backends.{optional}":
                raise


# The baseline first, then from general to specialised (the order of "all" and of reports).
PREFERRED_ORDER = ("loop", "grouped", "dequant", "cpu_fused", "triton")


def backend_names() -> list[str]:
    _load_builtin()
    rank = {name: i for i, name in enumerate(PREFERRED_ORDER)}
    return sorted(_REGISTRY, key=lambda name: rank.get(name, len(rank)))


def get_backend(name: str) -> Backend:
    _load_builtin()
    if name not in _REGISTRY:
        raise UserError(f"unknown backend {name!r}; known backends: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]()
