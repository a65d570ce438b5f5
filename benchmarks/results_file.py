"""Where a benchmark's record goes and how it names the command that made it (shared by the scripts)."""

from __future__ import annotations

import datetime as dt
import re
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def stem(folder: str | Path, kind: str, device_name: str, suffix: str = "") -> Path:
    """``folder/<kind>-<date>-<device slug><suffix>`` (no extension); the folder is made if need be."""
    slug = re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-")
    Path(folder).mkdir(parents=True, exist_ok=True)
    return Path(folder) / f"{kind}-{dt.date.today().isoformat()}-{slug}{suffix}"


def command(script: str, argv: Sequence[str] | None) -> str:
    """The shell line that ran ``benchmarks/<script>`` with ``argv`` (default: this process's)."""
    given = sys.argv[1:] if argv is None else list(argv)
    return shlex.join(["python", f"benchmarks/{script}", *given])
