"""The CLI with quantized experts: one set of rows per weight format, exact bytes, both accuracies."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from moecap_kernels.profile import main
from tests.helpers import tiny_config
from tests.test_metrics import matrix_bytes_by_hand

FAST = ["--warmup", "1", "--reps", "2", "--peak-bandwidth", "50e9", "--peak-flops", "500e9"]
HIDDEN, INTER, EXPERTS = 64, 96, 8
IDS = [[0, 3], [3, 5], [7, 3], [1, 2], [3, 0]]


def run(capsys, tmp_path, *argv: str) -> tuple[list[dict], str]:
    np.save(tmp_path / "ids.npy", np.array(IDS, dtype=np.int64))
    out = tmp_path / "out.json"
    config = tiny_config(tmp_path / "m", hidden=HIDDEN, inter=INTER, experts=EXPERTS)
    code = main(
        [
            "--config",
            str(config),
            "--routing",
            f"trace:{tmp_path / 'ids.npy'}",
            "--json",
            str(out),
            *FAST,
            *argv,
        ]
    )
    printed, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out.read_text())["results"], printed


def test_each_format_is_its_own_rows_with_exact_bytes_and_two_accuracies(tmp_path, capsys) -> None:
    formats = ["none", "int8", "int4-g16", "int4-g16-zp", "fp8-block", "mxfp4"]
    rows, printed = run(capsys, tmp_path, "--quant", ",".join(formats), "--backend", "all")
    assert [r["weight_format"] for r in rows] == sorted(
        (r["weight_format"] for r in rows), key=formats.index
    )  # formats in the order asked, each with every backend that computes it
    assert {r["weight_format"] for r in rows} == set(formats)
    activated = len({e for row in IDS for e in row})
    for r in rows:
        fmt = r["weight_format"]
        expert = matrix_bytes_by_hand(fmt, 2 * INTER, HIDDEN, INTER, 4) + matrix_bytes_by_hand(
            fmt, HIDDEN, INTER, HIDDEN, 4
        )
        assert r["bytes"]["expert_weights"] == activated * expert
        q = r["quant"]
        assert q["format"] == fmt and q["code_bytes"] + q["scale_bytes"] + q["zero_point_bytes"] == expert
        assert r["counts"]["tokens_per_expert"] == rows[0]["counts"]["tokens_per_expert"]  # one routing
        a = r["accuracy"]
        assert a["kernel_rel_error"] < 1e-5  # float32 activations: the kernel matches its own layer
        assert a["kernel_sqnr_db"] == pytest.approx(-20 * math.log10(a["kernel_rel_error"]))
        if fmt == "none":
            assert a["quant_rel_error"] == a["kernel_rel_error"]
        else:
            assert a["quant_rel_error"] > 100 * a["kernel_rel_error"]  # what compression costs
    assert "quant err" in printed and "int4-g16-zp" in printed


def test_unquantized_backends_are_left_out_of_quantized_formats(tmp_path, capsys) -> None:
    rows, _ = run(capsys, tmp_path, "--quant", "none,int8", "--backend", "loop,grouped,dequant")
    by_format = {}
    for r in rows:
        by_format.setdefault(r["weight_format"], []).append(r["backend"])
    assert by_format == {"none": ["loop", "grouped"], "int8": ["dequant"]}


def test_a_checkpoint_in_fp8_is_profiled_in_fp8_blocks_by_default(tmp_path, capsys) -> None:
    config = tiny_config(
        tmp_path / "fp8", hidden=256, inter=192, experts=EXPERTS,
        quantization_config={"quant_method": "fp8", "weight_block_size": [128, 128]},
    )  # fmt: skip
    out = tmp_path / "o.json"
    code = main(["--config", str(config), "--batch", "2", "--json", str(out), *FAST])
    printed, err = capsys.readouterr()
    assert code == 0, err
    rows = json.loads(out.read_text())["results"]
    assert {r["weight_format"] for r in rows} == {"fp8-block"}
    assert "profiled as fp8-block" in printed
    # partial 128-blocks: 192 rows per projection → 2 row blocks each; 256 and 192 columns → 2 each
    q = rows[0]["quant"]
    assert q["scale_bytes"] == 4 * (2 * 2 * 2 + 2 * 2)


def test_dry_run_prints_each_formats_bytes_per_expert(tmp_path, capsys) -> None:
    config = tiny_config(tmp_path / "m", hidden=HIDDEN, inter=INTER, experts=EXPERTS)
    formats = ["none", "w8a8", "int4-g32-zp", "fp8-tensor"]
    assert main(["--config", str(config), "--quant", ",".join(formats), "--dry-run", *FAST]) == 0
    printed = " ".join(capsys.readouterr()[0].split())  # undo the console's wrapping
    for fmt in formats:
        expert = matrix_bytes_by_hand(fmt, 2 * INTER, HIDDEN, INTER, 4) + matrix_bytes_by_hand(
            fmt, HIDDEN, INTER, HIDDEN, 4
        )
        assert f"{fmt} {expert:,} B" in printed
