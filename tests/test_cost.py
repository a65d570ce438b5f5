"""Cost: $/Mtok by rental and by ownership against hand-worked figures, the precedence of prices,
the shipped table's integrity, and the profile's cost block and flags."""

from __future__ import annotations

import json

import pytest

from moecap_kernels.cost import Prices, cost_of, price_table, resolve_prices
from moecap_kernels.errors import UserError
from moecap_kernels.hardware import datasheet_entries
from moecap_kernels.profile import main as profile_main
from tests.helpers import tiny_config


def test_rental_and_ownership_by_hand():
    # 2 devices at $3/h each, 500 tokens/s: 1.8 Mtok per hour for $6 → $3.333…/Mtok
    prices = Prices(3.0, "given", 20_000.0, "given", years=2, utilization=0.25, kwh_usd=0.2, devices=2)
    cost = cost_of(500.0, 0.9, prices, per="tokens")
    assert cost.rental_usd_per_mtok == pytest.approx(6 / 1.8)
    # 2 × $20,000 over 2 years busy a quarter of the time: 15,778,800 busy seconds, 7.8894e9 tokens
    assert cost.capital_usd_per_mtok == pytest.approx(40_000 / (2 * 365.25 * 86400 * 0.25 * 500) * 1e6)
    # 0.9 J/token · 1e6 tokens = 900 kJ = 0.25 kWh at $0.2
    assert cost.energy_usd_per_mtok == pytest.approx(0.05)
    assert cost.ownership_usd_per_mtok == pytest.approx(cost.capital_usd_per_mtok + 0.05)
    assert cost.best_known == cost.rental_usd_per_mtok


def test_without_measured_energy_there_is_no_ownership_figure():
    cost = cost_of(100.0, None, Prices(None, "none", 1000.0, "given"), per="tokens")
    assert cost.rental_usd_per_mtok is None and cost.energy_usd_per_mtok is None
    assert cost.capital_usd_per_mtok is not None and cost.ownership_usd_per_mtok is None
    assert cost.best_known is None


def test_prices_precedence_and_sources():
    table = resolve_prices("h100-sxm")
    assert table.hourly_usd == pytest.approx(55.04 / 8) and "p5.48xlarge" in table.hourly_source
    assert table.purchase_usd == 30_000 and table.purchase_source.startswith("estimate")
    given = resolve_prices("h100-sxm", price_per_hour=1.5, purchase_price=9.0, kwh_price=0.3)
    assert (given.hourly_usd, given.hourly_source) == (1.5, "--price-per-hour")
    assert (given.purchase_usd, given.kwh_usd, given.kwh_source) == (9.0, 0.3, "--kwh-price")
    instance = resolve_prices(None, instance="p5en.48xlarge")
    assert instance.hourly_usd == pytest.approx(63.296 / 8) and "÷ 8 GPUs" in instance.hourly_source
    cpu = resolve_prices(None)
    assert cpu.hourly_usd is None and "--price-per-hour" in cpu.hourly_source
    assert "not verified here" in resolve_prices(None, instance="m7a.large").hourly_source
    with pytest.raises(UserError, match=r"unknown instance 'x9\.huge'"):
        resolve_prices(None, instance="x9.huge")


def test_every_price_names_its_source_date_and_device():
    keys = {e.key for e in datasheet_entries()}
    table = price_table()
    assert set(table["gpus"]) <= keys
    for entry in table["gpus"].values():
        for what in ("hourly", "purchase"):
            if entry.get("usd_per_hour" if what == "hourly" else "purchase_usd") is not None:
                assert entry[f"{what}_source"] and entry[f"{what}_as_of"]
                assert isinstance(entry[f"{what}_verified"], bool)
    for entry in table["instances"].values():
        assert entry["usd_per_hour"] > 0 and entry["hourly_source"] and entry["hourly_as_of"]
        assert entry.get("gpu") is None or entry["gpu"] in keys


PEAKS = ["--peak-bandwidth", "50e9", "--peak-flops", "500e9"]


def test_profile_cost_block_and_column(tmp_path, capsys):
    out = tmp_path / "o.json"
    argv = ["--config", str(tiny_config(tmp_path / "m")), "--batch", "2", "--backend", "loop",
            "--warmup", "0", "--reps", "2", "--no-energy", "--json", str(out), *PEAKS,
            "--price-per-hour", "2.5", "--purchase-price", "1000", "--years", "3"]  # fmt: skip
    assert profile_main(argv) == 0
    row = json.loads(out.read_text())["results"][0]
    tps = row["tokens_per_s"]
    assert row["cost"]["rental_usd_per_mtok"] == pytest.approx(2.5 / (tps * 3600) * 1e6)
    assert row["cost"]["ownership_usd_per_mtok"] is None  # no measured energy
    assert row["cost"]["prices"]["years"] == 3 and "one MoE layer" in row["cost"]["per"]
    printed = capsys.readouterr().out
    assert "$/Mtok" in printed and "--price-per-hour" in printed


def test_list_prices_names_every_source(capsys):
    assert profile_main(["--list-prices"]) == 0
    out = capsys.readouterr().out
    assert "h100-sxm" in out and "c7a.large" in out and "(estimate)" in out and "2026-08-26" in out


def test_without_a_price_the_report_says_how_to_give_one(tmp_path, capsys):
    argv = ["--config", str(tiny_config(tmp_path / "m")), "--batch", "2", "--backend", "loop",
            "--warmup", "0", "--reps", "2", "--no-energy", *PEAKS]  # fmt: skip
    assert profile_main(argv) == 0
    out = capsys.readouterr().out
    assert "$/Mtok: not shown (rental: no price (give --price-per-hour or --instance" in out
    assert not any("$/Mtok" in line for line in out.splitlines() if "┃" in line)  # no empty column


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--price-per-hour", "-1"], "--price-per-hour: expected USD per device-hour from 0 to 10000"),
        (["--price-per-hour", "1", "--instance", "c7a.large"], "give --price-per-hour or --instance"),
        (["--utilization", "0"], "--utilization: expected a fraction from 0.01 to 1"),
        (["--instance", "c7a.large", "--offload", "disk"], "--instance applies to a profile's rows"),
        (["--radar", "x.pdf"], "--radar x.pdf: the file must end in .png or .svg"),
        (["--radar", "same.png", "--roofline", "same.png"], "name the same file"),
    ],
)
def test_bad_cost_and_picture_flags_are_one_line(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    assert profile_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
