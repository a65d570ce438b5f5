"""Files: the package's cache folder, and result files checked before any work and written
atomically, all or none. Imports nothing heavy, so any module may use it, and the CLI before it
loads torch.

Errors name the user's path, never the temporary file behind it.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

from moecap_kernels.errors import UserError


def cache_root() -> Path:
    """The package's cache folder: extension builds (one per hash) and calibrations.

    ``$MOECAP_CACHE_DIR``, else ``$XDG_CACHE_HOME/moecap_kernels``, else ``~/.cache/moecap_kernels``.
    """
    custom = os.environ.get("MOECAP_CACHE_DIR", "").strip()
    if custom:
        return Path(custom).expanduser()
    base = os.environ.get("XDG_CACHE_HOME")
    return (Path(base).expanduser() if base else Path.home() / ".cache") / "moecap_kernels"


def check_cache_root() -> Path:
    """``cache_root()`` when it is a folder or can become one, else a one-line UserError."""
    root = cache_root()
    existing = next((p for p in (root, *root.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        where = "MOECAP_CACHE_DIR" if os.environ.get("MOECAP_CACHE_DIR", "").strip() else "the cache folder"
        raise UserError(f"{where} {root}: {existing} is a file, not a folder")
    return root


def _folder(path: Path) -> Path:
    return path.parent if str(path.parent) else Path(".")


def check_writable(text: str, flag: str) -> Path:
    """The output path ``text`` of ``flag`` when a file can be written there now, else UserError.

    Creates and removes a temporary file in the folder: the only test that answers for every
    filesystem, permission and quota alike.
    """
    if not text.strip():
        raise UserError(f"{flag} needs a file path, got an empty string")
    path = Path(text).expanduser()
    if path.is_dir():
        raise UserError(f"{flag} {text}: is a folder, not a file")
    folder = _folder(path)
    if not folder.is_dir():
        raise UserError(f"{flag} {text}: folder {folder} does not exist")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise UserError(f"{flag} {text}: cannot write in {folder} ({exc.strerror or exc})") from None
    os.close(fd)
    Path(probe).unlink(missing_ok=True)
    return path


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _naming(exc: OSError, path: Path) -> OSError:
    """``exc`` re-told about ``path`` (the user's), not about the temporary file it happened to."""
    return OSError(exc.errno, exc.strerror or str(exc), str(path))


def _write_temp(path: Path, text: str | bytes) -> Path:
    """``text`` (or bytes) in a new temporary file beside ``path``, flushed; OSError names ``path``."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=_folder(path))
    except OSError as exc:
        raise _naming(exc, path) from None
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # as open() would make it: mkstemp's files are private (0600)
        binary = isinstance(text, bytes)
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"newline": ""})) as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise _naming(exc, path) from None
        raise
    return Path(tmp)


def write_all_atomic(files: Mapping[str | Path, str | bytes]) -> None:
    """Write every file so that readers see each old file or its whole new text, and either all new
    texts or none: every temporary file is written before the first one replaces its target."""
    temps: dict[Path, Path] = {}
    try:
        for path, text in files.items():
            temps[Path(path)] = _write_temp(Path(path), text)
        for path, tmp in temps.items():
            try:
                os.replace(tmp, path)
            except OSError as exc:
                raise _naming(exc, path) from None
    finally:
        for tmp in temps.values():
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)


def write_atomic(path: str | Path, text: str | bytes) -> None:
    """Write ``text`` to ``path`` so that readers see the old file or the whole new one, never half."""
    write_all_atomic({path: text})


def read_json(path: Path, what: str, max_bytes: int) -> object:
    """The JSON document in ``path``; one ``UserError`` line, naming it as ``what``, when it is missing,
    larger than ``max_bytes`` or not readable JSON."""
    try:
        if path.stat().st_size > max_bytes:
            raise UserError(f"{what}: larger than {max_bytes} bytes")
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{what}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{what}: not a readable JSON file ({str(exc).splitlines()[0]})") from None
