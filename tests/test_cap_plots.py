"""The CAP picture: axis scores against their stated scaling, the terminal bars, and the radar and
roofline files (PNG and SVG opened and read back)."""

from __future__ import annotations

import dataclasses
import io
import math
import xml.etree.ElementTree as ET

import pytest
import torch

from moecap_kernels import hardware
from moecap_kernels.cap import ACCURACY_FULL_SCALE_DB, bar, cap_points, cap_table
from moecap_kernels.cost import Prices
from moecap_kernels.errors import UserError
from moecap_kernels.plots import check_plot_path, radar, render, roofline
from moecap_kernels.profile import main as profile_main
from moecap_kernels.profile import with_cost
from moecap_kernels.report import sqnr_db
from moecap_kernels.routing import parse_routing
from moecap_kernels.runner import ProfileRequest, Scenario, run_profile
from tests.hardware_fakes import fake_info
from tests.helpers import tiny_config, tiny_spec

matplotlib = pytest.importorskip("matplotlib", reason="the plot extra is not installed")


@pytest.fixture(scope="module")
def rows():
    spec = tiny_spec(hidden_size=64, intermediate_size=32, weight_dtype="float32", act_dtype="float32")
    request = ProfileRequest(
        spec=spec,
        scenarios=(Scenario("decode", 1), Scenario("decode", 6)),
        backends=("loop", "cpu_fused"),
        routing=parse_routing("router"),
        device=torch.device("cpu"),
        warmup=0,
        reps=3,
        formats=("none", "int8"),
        measure_energy=False,
    )
    info = dataclasses.replace(fake_info("cpu", "test CPU"), llc_bytes=1 << 16)
    peaks = {"float32": hardware.Peaks(40e9, 200e9, "float32", "measured: test", "measured: test")}
    return run_profile(request, info, peaks)


def test_scores_follow_the_stated_scaling(rows):
    points = cap_points(rows)
    assert len(points) == len(rows) == 6  # loop computes unquantized experts only
    assert {p.group for p in points} == {"decode T=1", "decode T=6"}
    for group in ("decode T=1", "decode T=6"):
        members = [(p, r) for p, r in zip(points, rows, strict=True) if p.group == group]
        fastest = max(r.tokens / r.time.median for _, r in members)
        for p, r in members:
            assert p.scores["Throughput"] == pytest.approx(r.tokens / r.time.median / fastest)
            assert p.scores["Utilization"] == pytest.approx(min(r.util.s_mbu, 1.0))
            expected = min(max(sqnr_db(r.quant_rel_error) / ACCURACY_FULL_SCALE_DB, 0), 1)
            assert p.scores["Accuracy"] == pytest.approx(expected)
            assert p.scores["Cost"] is None  # no price
        assert max(p.scores["Throughput"] for p, _ in members) == 1.0
    by_label = {(p.group, p.label): p for p in points}
    assert (
        by_label[("decode T=1", "cpu_fused int8")].scores["Accuracy"]
        < by_label[("decode T=1", "cpu_fused")].scores["Accuracy"]
    )


def test_one_hourly_price_makes_cost_the_throughput_axis(rows):
    prices = Prices(2.0, "given", None, "none")
    points = cap_points([with_cost(r, prices) for r in rows])
    for p in points:
        assert p.scores["Cost"] == pytest.approx(p.scores["Throughput"])  # $/Mtok ∝ 1 / tokens/s
        assert p.raw["Cost"] == pytest.approx(2.0 / (p.raw["Throughput"] * 3600) * 1e6)


def test_bars():
    assert bar(1.0) == "█" * 8 and bar(0.0) == "·" * 8 and bar(None).startswith("n/a")
    assert bar(0.5) == "████····" and bar(0.53).startswith("████▎")
    assert all(len(bar(x / 17)) == 8 for x in range(18))


def test_terminal_table_has_a_row_per_result(rows):
    table = cap_table(cap_points(rows))
    assert table.row_count == len(rows)
    assert [c.header for c in table.columns][2:] == ["Cost", "Accuracy", "Throughput", "Utilization"]


def _svg_text(data: bytes) -> str:
    root = ET.fromstring(data)
    assert root.tag.endswith("svg")
    return " ".join(t for t in root.itertext())


@pytest.mark.parametrize("draw", [radar, roofline])
def test_pictures_are_valid_png_and_svg(rows, draw):
    import matplotlib.image

    png = render(draw(rows), "x.png")
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = matplotlib.image.imread(io.BytesIO(png), format="png")
    assert pixels.shape[0] > 300 and pixels.shape[1] > 500 and pixels.std() > 0.05  # not a blank image
    text = _svg_text(render(draw(rows), "x.svg"))
    if draw is radar:
        for word in (
            "Cost",
            "Accuracy",
            "Throughput",
            "Utilization",
            "decode T=1",
            "decode T=6",
            "cpu_fused int8",
        ):
            assert word in text
    else:
        assert "measured" in text and "cpu_fused T=6" in text and "40.0 GB/s" in text


def test_roofline_plots_each_row_at_its_intensity_and_rate(rows):
    fig = roofline(rows)
    ax = fig.axes[0]
    points = [c.get_offsets()[0] for c in ax.collections]
    assert len(points) == len(rows)
    expected = sorted((r.util.arithmetic_intensity, r.flops.useful / r.time.median) for r in rows)
    assert sorted(map(tuple, points)) == pytest.approx(expected)
    assert all(math.isfinite(x) and y > 0 for x, y in points)


def test_the_cli_writes_both_pictures(tmp_path, capsys):
    radar_path, roof_path = tmp_path / "cap.svg", tmp_path / "roof.png"
    argv = ["--config", str(tiny_config(tmp_path / "m")), "--batch", "1,3", "--backend", "loop",
            "--warmup", "0", "--reps", "2", "--no-energy", "--peak-bandwidth", "50e9", "--peak-flops",
            "500e9", "--radar", str(radar_path), "--roofline", str(roof_path)]  # fmt: skip
    assert profile_main(argv) == 0
    assert "decode T=3" in _svg_text(radar_path.read_bytes())
    assert roof_path.read_bytes()[:4] == b"\x89PNG"
    assert "CAP: Cost · Accuracy · Performance" in capsys.readouterr().out


def test_no_matplotlib_is_one_clear_line(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name: None if name == "matplotlib" else real(name)
    )
    with pytest.raises(UserError, match=r"--radar needs matplotlib: pip install 'moecap_kernels\[plot\]'"):
        check_plot_path("a.png", "--radar")
