"""Loads the compiled ``torch.ops.moecap`` extension (JIT-built from ``csrc/`` on first use).

The build lands in a cache folder keyed by a hash of the sources, the torch version and the
flavour (cpu or cuda), so editing a source or upgrading torch rebuilds instead of loading a
stale library. Nothing here raises: when the build is impossible or fails, callers use the
pure-torch fallback and ``extension_status()`` says why in one line.

Environment:
- ``MOECAP_NO_EXTENSION=1``   never build or load; use the pure-torch fallback.
- ``MOECAP_CACHE_DIR``        build root (default ``$XDG_CACHE_HOME/moecap_kernels``, else
                              ``~/.cache/moecap_kernels``).
- ``MOECAP_VERBOSE_BUILD=1``  show the compiler output and torch's build messages.

``python -m moecap_kernels._ext`` builds (or loads) the extension and prints its status.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

from moecap_kernels.files import cache_root

LIB_NAMESPACE = "moecap"
_LIB_NAME = "moecap_kernels_ext"
CSRC_DIR = Path(__file__).resolve().parent.parent / "csrc"
# -fopenmp: the CPU MoE kernel runs on torch's OpenMP thread pool (Linux; Apple clang lacks the flag).
_CFLAGS = ("-O3", "-fopenmp") if sys.platform.startswith("linux") else ("-O3",)
_CUDA_CFLAGS = ("-O3", "--expt-relaxed-constexpr")


@dataclass(frozen=True)
class _State:
    loaded: bool
    flavour: str  # "cpu", "cuda" or "" when not loaded
    reason: str  # why the fallback is used; or a note about a failed cuda attempt


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


def _sources(flavour: str) -> list[Path]:
    """The files compiled for ``flavour``: every csrc/*.cpp, plus every csrc/*.cu for cuda."""
    files = sorted(CSRC_DIR.glob("*.cpp"))
    if flavour == "cuda":
        files += sorted(CSRC_DIR.glob("*.cu"))
    return files


def _build_hash(flavour: str) -> str:
    """Hash of everything that changes the built library: all csrc files, torch, flags."""
    digest = hashlib.sha256()
    for key in (flavour, torch.__version__, str(torch.version.cuda), sys.version.split()[0]):
        digest.update(key.encode() + b"\0")
    digest.update(" ".join(_CFLAGS + _CUDA_CFLAGS).encode() + b"\0")
    for path in sorted(p for p in CSRC_DIR.iterdir() if p.is_file()):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def _cuda_candidate() -> tuple[bool, str]:
    """Whether to try a CUDA build, and if not, why (for the status line)."""
    if torch.version.cuda is None:
        return False, "torch is a CPU build"
    if not torch.cuda.is_available():
        return False, "no CUDA device visible"
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is None:
        return False, "no CUDA toolkit (nvcc) found"
    return True, ""


@contextlib.contextmanager
def _quiet(verbose: bool) -> Iterator[None]:
    """Silences torch's build warnings and prints unless ``verbose``."""
    if verbose:
        yield
        return
    sink = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        warnings.simplefilter("ignore")
        yield


def _build(flavour: str) -> None:
    """JIT-compiles and loads the ``flavour`` build; raises on any failure."""
    from torch.utils.cpp_extension import load

    if not _sources(flavour):
        raise RuntimeError(f"no C++ sources in {CSRC_DIR}")
    build_dir = cache_root() / f"{flavour}-{_build_hash(flavour)}"
    build_dir.mkdir(parents=True, exist_ok=True)
    verbose = _env_flag("MOECAP_VERBOSE_BUILD")
    cflags = list(_CFLAGS) + (["-DMOECAP_WITH_CUDA"] if flavour == "cuda" else [])
    with _quiet(verbose):
        load(
            name=_LIB_NAME,
            sources=[str(p) for p in _sources(flavour)],
            extra_cflags=cflags,
            extra_cuda_cflags=list(_CUDA_CFLAGS),
            build_directory=str(build_dir),
            is_python_module=False,
            with_cuda=flavour == "cuda",
            verbose=verbose,
        )


def _one_line(exc: BaseException) -> str:
    """A short reason: the exception type and the first non-empty line of its message."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    first = lines[0] if lines else ""
    return f"{type(exc).__name__}: {first}"[:200]


@cache
def _state() -> _State:
    if _env_flag("MOECAP_NO_EXTENSION"):
        return _State(False, "", "disabled by MOECAP_NO_EXTENSION")
    try_cuda, why_not_cuda = _cuda_candidate()
    note = ""
    for flavour in ("cuda", "cpu") if try_cuda else ("cpu",):
        try:
            _build(flavour)
        except Exception as exc:  # any build or load failure means: use the fallback
            note = f"{flavour} build failed ({_one_line(exc)})"
            continue
        return _State(True, flavour, note or why_not_cuda)
    return _State(False, "", note)


def load_extension() -> bool:
    """Builds (first time) and loads the extension; True when its ops are registered. Never raises."""
    return _state().loaded


def extension_status() -> str:
    """One line for reports, e.g. ``compiled extension (cpu)`` or ``pure-torch fallback: <reason>``."""
    state = _state()
    if state.loaded:
        suffix = f"; {state.reason}" if state.reason and state.flavour == "cpu" else ""
        return f"compiled extension ({state.flavour}){suffix}"
    return f"pure-torch fallback: {state.reason}"


def has_op(name: str, device_type: str | None = None) -> bool:
    """Whether ``torch.ops.moecap.<name>`` is loaded (and, if given, has a kernel for ``device_type``)."""
    if not load_extension():
        return False
    if not hasattr(getattr(torch.ops, LIB_NAMESPACE), name):
        return False
    if device_type is None or device_type == "cpu":
        return True
    return device_type == "cuda" and _state().flavour == "cuda"


def main() -> int:
    """Builds or loads the extension and prints its status; exit 1 only when a build failed."""
    start = time.perf_counter()
    loaded = load_extension()
    seconds = time.perf_counter() - start
    print(f"moecap_kernels: {extension_status()} [{seconds:.1f} s]")
    if loaded:
        print(f"build cache: {cache_root()}")
    return 0 if loaded or _env_flag("MOECAP_NO_EXTENSION") else 1


if __name__ == "__main__":
    raise SystemExit(main())
