"""Compare two result files for kernel CI: ``python -m moecap_kernels.compare BASE.json NEW.json
[--threshold 5%]``.

Rows are matched by (model, backend, weight format, phase, T). A row got **slower** when its median
time grew by more than the threshold *and* beyond the measured spread: the new p10 lies above the
base p90, so the two runs' repetitions do not overlap. Exit codes: 1 when a row got slower, 0
otherwise, 2 on bad input (an unreadable file, another schema version, duplicate rows, a bad
threshold), with one line on stderr.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from moecap_kernels.errors import UserError
from moecap_kernels.exits import run_cli
from moecap_kernels.files import read_json
from moecap_kernels.limits import MAX_SMALL_FILE_BYTES

SCHEMA_VERSION = 1  # the version of report.SCHEMA_VERSION this reader knows
KEY_FIELDS = ("model", "backend", "weight_format", "phase", "tokens")
MAX_RESULT_BYTES = 256 * MAX_SMALL_FILE_BYTES


def parse_threshold(text: str) -> float:
    """``5%`` or ``0.05`` → 0.05; from 0 to 10 (1000%)."""
    raw = text.strip()
    try:
        value = float(raw[:-1]) / 100 if raw.endswith("%") else float(raw)
    except ValueError:
        raise UserError(
            f"--threshold {text!r}: expected a fraction like 0.05 or a percentage like 5%"
        ) from None
    if not 0 <= value <= 10:
        raise UserError(f"--threshold {text!r}: expected 0% to 1000%")
    return value


def load_rows(path: Path) -> dict[tuple, dict[str, Any]]:
    """{row key: result} of a profile's JSON, checked: readable, this schema, no duplicate rows."""
    doc = read_json(path, str(path), MAX_RESULT_BYTES)
    if not isinstance(doc, dict) or "schema_version" not in doc:
        raise UserError(f"{path}: not a moecap_kernels results file (no schema_version)")
    if doc["schema_version"] != SCHEMA_VERSION:
        raise UserError(
            f"{path}: schema version {doc['schema_version']!r}, this reader knows {SCHEMA_VERSION}"
        )
    results = doc.get("results")
    if not isinstance(results, list):
        raise UserError(f"{path}: no results list")
    rows: dict[tuple, dict[str, Any]] = {}
    for i, row in enumerate(results):
        try:
            # files written before weight formats existed hold unquantized rows only
            key = tuple(row.get(f, "none") if f == "weight_format" else row[f] for f in KEY_FIELDS)
            float(row["time_s"]["median"]), float(row["time_s"]["p10"]), float(row["time_s"]["p90"])
        except (KeyError, TypeError, ValueError):
            raise UserError(f"{path}: results[{i}] lacks {', '.join(KEY_FIELDS)} or time_s") from None
        if key in rows:
            raise UserError(f"{path}: two rows for {' / '.join(map(str, key))}")
        rows[key] = row
    return rows


def verdict(base: dict[str, Any], new: dict[str, Any], threshold: float) -> str:
    """``slower``, ``faster`` (the mirror rule) or ``same``."""
    b, n = base["time_s"], new["time_s"]
    if n["median"] > b["median"] * (1 + threshold) and n["p10"] > b["p90"]:
        return "slower"
    if b["median"] > n["median"] * (1 + threshold) and b["p10"] > n["p90"]:
        return "faster"
    return "same"


def compare(base: dict[tuple, dict], new: dict[tuple, dict], threshold: float) -> list[dict[str, Any]]:
    """One entry per row key in either file, in the base file's order, then the new file's."""
    out = []
    for key in list(base) + [k for k in new if k not in base]:
        b, n = base.get(key), new.get(key)
        entry: dict[str, Any] = dict(zip(KEY_FIELDS, key, strict=True))  # weight_format filled in
        entry["base"], entry["new"] = b, n
        entry["verdict"] = (
            "only in base" if n is None else "only in new" if b is None else verdict(b, n, threshold)
        )
        out.append(entry)
    return out


def _time(row: dict[str, Any] | None) -> str:
    if row is None:
        return "—"
    t = row["time_s"]
    return f"{t['median'] * 1e3:.3f} ms ({t['p10'] * 1e3:.3f}–{t['p90'] * 1e3:.3f})"


def _pair(b: dict | None, n: dict | None, get: Any, fmt: str) -> str:
    values = [None if r is None else get(r) for r in (b, n)]
    return " → ".join("—" if v is None else format(v, fmt) for v in values)


def table(entries: list[dict[str, Any]], threshold: float):  # -> rich.table.Table
    from rich.table import Table

    t = Table(title=f"base → new (slower: median + {threshold:.0%} and new p10 above base p90)")
    columns = ("model", "backend", "format", "phase", "T", "base time (p10–p90)", "new time (p10–p90)",
               "Δ time", "S-MBU", "S-MFU", "rel. err", "verdict")  # fmt: skip
    for col in columns:
        t.add_column(col, justify="right" if col not in ("model", "backend", "verdict") else "left")
    for e in entries:
        b, n = e["base"], e["new"]
        delta = "—" if b is None or n is None else f"{n['time_s']['median'] / b['time_s']['median'] - 1:+.1%}"
        style = {"slower": "bold red", "faster": "green"}.get(e["verdict"], "")
        t.add_row(
            e["model"], e["backend"], e["weight_format"], e["phase"], str(e["tokens"]),
            _time(b), _time(n), delta,
            _pair(b, n, lambda r: r.get("s_mbu"), ".1%"),
            _pair(b, n, lambda r: r.get("s_mfu"), ".1%"),
            _pair(b, n, lambda r: (r.get("accuracy") or {}).get("rel_error"), ".1e"),
            f"[{style}]{e['verdict']}[/{style}]" if style else e["verdict"],
        )  # fmt: skip
    return t


def run(argv: Sequence[str] | None) -> int:
    from moecap_kernels.profile import _Parser, text_arg

    p = _Parser(prog="python -m moecap_kernels.compare", description="Compare two result files.")
    p.add_argument("base", type=text_arg, help="the reference run's --json")
    p.add_argument("new", type=text_arg, help="the run to check")
    p.add_argument("--threshold", type=text_arg, default="5%", help="slowdown to flag, e.g. 5%% (default)")
    args = p.parse_args(argv)
    threshold = parse_threshold(args.threshold)
    base, new = load_rows(Path(args.base)), load_rows(Path(args.new))
    entries = compare(base, new, threshold)
    from moecap_kernels.profile import _console

    console = _console()
    console.print(table(entries, threshold))
    devices = [sorted({r.get("device", "?") for r in rows.values()}) for rows in (base, new)]
    if devices[0] != devices[1]:
        console.print(
            f"the runs are of different devices: {devices[0]} → {devices[1]}", style="yellow", markup=False
        )
    slower = [e for e in entries if e["verdict"] == "slower"]
    console.print(
        f"{len(slower)} of {len(entries)} rows slower", style="bold red" if slower else "dim", markup=False
    )
    return 1 if slower else 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(lambda: run(argv))


if __name__ == "__main__":
    raise SystemExit(main())
