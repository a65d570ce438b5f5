"""Run comparison: a planted slowdown is flagged (exit 1), an identical re-run passes (exit 0), bad
input is one line and exit 2."""

from __future__ import annotations

import copy
import json

import pytest

from moecap_kernels.compare import main as compare_main
from moecap_kernels.profile import main as profile_main
from tests.helpers import tiny_config

PEAKS = ["--peak-bandwidth", "50e9", "--peak-flops", "500e9"]


@pytest.fixture(scope="module")
def base_json(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("cmp")
    out = folder / "base.json"
    code = profile_main(
        ["--config", str(tiny_config(folder / "m")), "--batch", "1,4", "--backend", "loop,grouped",
         "--warmup", "1", "--reps", "5", "--json", str(out), *PEAKS]
    )  # fmt: skip
    assert code == 0
    return json.loads(out.read_text())


def _write(tmp_path, name: str, doc: dict):
    path = tmp_path / name
    path.write_text(json.dumps(doc))
    return str(path)


def _slowed(doc: dict, index: int, factor: float) -> dict:
    new = copy.deepcopy(doc)
    for key in ("median", "p10", "p90"):
        new["results"][index]["time_s"][key] *= factor
    return new


def test_identical_rerun_passes_and_planted_slowdown_fails(tmp_path, base_json, capsys):
    base = _write(tmp_path, "base.json", base_json)
    assert compare_main([base, base]) == 0
    assert "0 of 4 rows slower" in capsys.readouterr().out
    spread = base_json["results"][2]["time_s"]
    factor = max(1.2, spread["p90"] / spread["p10"] * 1.01)  # 20%, and past the row's own spread
    slow = _write(tmp_path, "slow.json", _slowed(base_json, 2, factor))
    assert compare_main([base, slow, "--threshold", "5%"]) == 1
    out = capsys.readouterr().out
    assert "1 of 4 rows slower" in out and "slower" in out
    assert compare_main([base, slow, "--threshold", f"{factor * 100:.0f}%"]) == 0  # within the threshold
    capsys.readouterr()
    assert compare_main([slow, base]) == 0  # faster is not a failure
    assert "faster" in capsys.readouterr().out


def test_a_slowdown_inside_the_spread_is_not_flagged(tmp_path, base_json, capsys):
    doc = copy.deepcopy(base_json)
    t = doc["results"][0]["time_s"]
    t["p10"], t["p90"] = t["median"] * 0.5, t["median"] * 2.0  # a noisy base
    new = copy.deepcopy(doc)
    new["results"][0]["time_s"].update(median=t["median"] * 1.3, p10=t["median"] * 1.2, p90=t["median"] * 1.4)
    assert compare_main([_write(tmp_path, "a.json", doc), _write(tmp_path, "b.json", new)]) == 0
    capsys.readouterr()


def test_rows_only_in_one_file_are_listed(tmp_path, base_json, capsys):
    fewer = copy.deepcopy(base_json)
    del fewer["results"][1]
    assert compare_main([_write(tmp_path, "a.json", base_json), _write(tmp_path, "b.json", fewer)]) == 0
    assert "only in base" in capsys.readouterr().out


def test_bad_input_is_one_line_and_exit_2(tmp_path, base_json, capsys):
    good = _write(tmp_path, "good.json", base_json)
    future = _write(tmp_path, "v99.json", {**base_json, "schema_version": 99})
    twice = _write(tmp_path, "twice.json", {**base_json, "results": base_json["results"] * 2})
    (tmp_path / "junk.json").write_text("{not json")
    cases = [
        ([good, str(tmp_path / "missing.json")], "no such file"),
        ([good, future], "schema version 99"),
        ([good, twice], "two rows for"),
        ([good, str(tmp_path / "junk.json")], "not a readable JSON"),
        ([good, good, "--threshold", "lots"], "expected a fraction"),
        ([good], "the following arguments are required"),
    ]
    for argv, match in cases:
        assert compare_main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and match in err, err
