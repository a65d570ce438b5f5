"""The JSON document is strict: non-finite numbers become null, each named with what it was."""

from __future__ import annotations

import json
import math

from moecap_kernels.report import _finite


def test_non_finite_numbers_become_null_and_are_named() -> None:
    doc = {"a": 1.5, "b": [math.inf, 2, {"c": math.nan}], "d": {"e": -math.inf, "f": "x"}}
    clean, nulls = _finite(doc, "")
    assert clean == {"a": 1.5, "b": [None, 2, {"c": None}], "d": {"e": None, "f": "x"}}
    assert set(nulls) == {"b[0]", "b[2].c", "d.e"} and "inf" in nulls["b[0]"]
    json.dumps(clean, allow_nan=False)  # strict JSON now


def test_finite_documents_are_left_alone() -> None:
    doc = {"results": [{"s_mbu": 0.5, "counts": [1, 2, 3]}]}
    assert _finite(doc, "") == (doc, {})
