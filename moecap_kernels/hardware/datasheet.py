"""Vendor datasheet peaks, kept as data in ``datasheet.json`` (each entry with its source), and the
matching of a reported device name to an entry.

The JSON's ``about`` says what the figures are: dense (never 2:4 sparse), bf16/fp16 tensor-core rates
with FP32 accumulation, decimal TB/s and TFLOP/s.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

from moecap_kernels.dtypes import canonical_compute_dtype

TERA = 1e12


@dataclass(frozen=True)
class DatasheetEntry:
    """Vendor peaks for one accelerator SKU, and how to recognise its reported name.

    ``match``: regexes that must *all* be found in the normalised device name (upper case,
    ``-``/``_`` turned into spaces); ``exclude``: regexes of which none may be found.
    """

    key: str
    name: str
    match: tuple[str, ...]
    bandwidth_bytes_per_s: float
    memory_gb: float  # vendor's nominal capacity ("80GB" on HBM parts is 80 GiB)
    bf16_flops: float
    fp16_flops: float
    fp32_flops: float
    source: str
    url: str
    tf32_flops: float | None = None
    int8_ops: float | None = None  # dense int8 tensor-core OP/s, where the table has it
    exclude: tuple[str, ...] = ()
    note: str = ""  # what we could and could not verify, and any caveat

    def peak_flops(self, dtype: str) -> float | None:
        """Dense peak FLOP/s (OP/s for int8) for ``dtype`` (canonical or alias name); None when the
        table has no figure for it."""
        key = canonical_compute_dtype(dtype)
        return {
            "bfloat16": self.bf16_flops,
            "float16": self.fp16_flops,
            "float32": self.fp32_flops,
            "int8": self.int8_ops,
        }[key]

    def matches(self, normalized_name: str) -> bool:
        return all(re.search(p, normalized_name) for p in self.match) and not any(
            re.search(p, normalized_name) for p in self.exclude
        )

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DatasheetEntry:
        tf32, int8 = data.get("tf32_tflops"), data.get("int8_tops")
        return cls(
            key=data["key"],
            name=data["name"],
            match=tuple(data["match"]),
            bandwidth_bytes_per_s=data["bandwidth_tb_per_s"] * TERA,
            memory_gb=data["memory_gb"],
            bf16_flops=data["bf16_tflops"] * TERA,
            fp16_flops=data["fp16_tflops"] * TERA,
            fp32_flops=data["fp32_tflops"] * TERA,
            source=data["source"],
            url=data["url"],
            tf32_flops=None if tf32 is None else tf32 * TERA,
            int8_ops=None if int8 is None else int8 * TERA,
            exclude=tuple(data.get("exclude", ())),
            note=data.get("note", ""),
        )


@cache
def datasheet_entries() -> tuple[DatasheetEntry, ...]:
    """The table, in matching order, read once from the package's ``datasheet.json``."""
    text = (resources.files("moecap_kernels.hardware") / "datasheet.json").read_text(encoding="utf-8")
    return tuple(DatasheetEntry.from_json(e) for e in json.loads(text)["entries"])


# Names that never get datasheet peaks: a MIG slice or a mobile part has a fraction of the SKU's.
_NEVER_MATCH = (r"\bMIG\b", r"\bLAPTOP\b", r"\bMOBILE\b", r"\bMAX Q\b")


def normalize_device_name(name: str) -> str:
    """Upper-case ``name`` with ``-``/``_`` as spaces and single spacing, for regex matching."""
    return re.sub(r"\s+", " ", re.sub(r"[-_]", " ", name)).strip().upper()


def datasheet_entry(name: str) -> DatasheetEntry | None:
    """The first table entry whose patterns match ``name`` (as torch or NVML reports it), else None."""
    norm = normalize_device_name(name)
    if not norm or any(re.search(p, norm) for p in _NEVER_MATCH):
        return None
    return next((e for e in datasheet_entries() if e.matches(norm)), None)


def format_datasheet() -> str:
    """A plain-text table of the datasheet for a ``--list-devices`` printout."""
    head = f"{'device':<26} {'mem GB':>6} {'BW TB/s':>8} {'BF16 TF':>8} {'FP16 TF':>8} {'FP32 TF':>8}  source"
    rows = [head, "-" * len(head)]
    for e in datasheet_entries():
        rows.append(
            f"{e.name:<26} {e.memory_gb:>6g} {e.bandwidth_bytes_per_s / TERA:>8.3f} "
            f"{e.bf16_flops / TERA:>8.1f} {e.fp16_flops / TERA:>8.1f} {e.fp32_flops / TERA:>8.1f}  {e.source}"
        )
    return "\n".join(rows)
