"""Cost: dollars per million tokens, two ways, each with its denominator named.

- **Rental**: an hourly price per device (``--price-per-hour``, or the shipped table's on-demand
  price) over the tokens one device-hour processes: ``$/h · devices / (tokens/s · 3600) · 1e6``.
- **Ownership**: the purchase price amortised over ``years`` of which a fraction ``utilization`` is
  busy, ``purchase · devices / (years · 365.25 · 86400 · utilization · tokens/s) · 1e6``, plus the
  measured energy at ``kwh_price``: ``J/token · 1e6 / 3.6e6 · $/kWh``. Without measured energy the
  ownership figure is not given (a TDP times a time would be a guess), only its capital part.

A profile row is one MoE layer: its tokens/s, and so its $/Mtok, are of that layer alone. The
prices table (``hardware/prices.json``) gives each figure's source and date; an unverified one says so.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from functools import cache
from importlib import resources
from typing import Any

from moecap_kernels.errors import UserError

SECONDS_PER_YEAR = 365.25 * 86400
JOULES_PER_KWH = 3.6e6
DEFAULT_YEARS = 4.0
DEFAULT_UTILIZATION = 0.5
DEFAULT_KWH_PRICE = 0.10  # USD; an assumption, printed wherever it is used


@dataclass(frozen=True)
class Prices:
    """What a device costs, per device, and where each figure came from."""

    hourly_usd: float | None
    hourly_source: str
    purchase_usd: float | None
    purchase_source: str
    years: float = DEFAULT_YEARS
    utilization: float = DEFAULT_UTILIZATION
    kwh_usd: float = DEFAULT_KWH_PRICE
    kwh_source: str = "assumed (--kwh-price)"
    devices: int = 1  # devices a row runs on (its figures are of all of them)

    def describe(self) -> str:
        """One line: every price and assumption behind the $/Mtok figures."""
        hourly = (
            f"rental ${self.hourly_usd:,.4g}/device-hour ({self.hourly_source})"
            if self.hourly_usd is not None
            else f"rental: {self.hourly_source}"
        )
        own = (
            f"ownership ${self.purchase_usd:,.0f}/device ({self.purchase_source}) over {self.years:g} years "
            f"at {self.utilization:.0%} utilization"
            if self.purchase_usd is not None
            else f"ownership: {self.purchase_source}"
        )
        return f"{hourly}; {own}; energy at ${self.kwh_usd:g}/kWh ({self.kwh_source})"


@dataclass(frozen=True)
class Cost:
    """$ per million tokens of one row; None where a price or a measurement is missing."""

    rental_usd_per_mtok: float | None
    capital_usd_per_mtok: float | None
    energy_usd_per_mtok: float | None
    ownership_usd_per_mtok: float | None
    prices: Prices
    per: str  # the denominator: what one "token" is

    @property
    def best_known(self) -> float | None:
        """The figure the CAP radar draws: rental when priced, else ownership."""
        return (
            self.rental_usd_per_mtok if self.rental_usd_per_mtok is not None else self.ownership_usd_per_mtok
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "rental_usd_per_mtok": self.rental_usd_per_mtok,
            "ownership_usd_per_mtok": self.ownership_usd_per_mtok,
            "capital_usd_per_mtok": self.capital_usd_per_mtok,
            "energy_usd_per_mtok": self.energy_usd_per_mtok,
            "per": self.per,
            "prices": asdict(self.prices),
        }


def cost_of(tokens_per_s: float, joules_per_token: float | None, prices: Prices, per: str) -> Cost:
    """The $/Mtok of a device (or ``prices.devices`` of them) processing ``tokens_per_s``."""
    mtok_per_hour = tokens_per_s * 3600 / 1e6
    rental = None if prices.hourly_usd is None else prices.hourly_usd * prices.devices / mtok_per_hour
    capital = None
    if prices.purchase_usd is not None:
        busy_seconds = prices.years * SECONDS_PER_YEAR * prices.utilization
        capital = prices.purchase_usd * prices.devices / (busy_seconds * tokens_per_s) * 1e6
    energy = None if joules_per_token is None else joules_per_token * 1e6 / JOULES_PER_KWH * prices.kwh_usd
    ownership = None if capital is None or energy is None else capital + energy
    return Cost(rental, capital, energy, ownership, prices, per)


# --- the shipped table -----------------------------------------------------------------------


@cache
def price_table() -> dict[str, Any]:
    text = (resources.files("moecap_kernels.hardware") / "prices.json").read_text(encoding="utf-8")
    return json.loads(text)


def instance_names() -> list[str]:
    return sorted(price_table()["instances"])


def gpu_prices(key: str) -> dict[str, Any] | None:
    """The table's entry for a datasheet GPU key (``hardware/datasheet.json``), or None."""
    return price_table()["gpus"].get(key)


def _cited(entry: dict[str, Any], what: str) -> str:
    verified = "" if entry.get(f"{what}_verified", False) else ", not verified here"
    return f"{entry[f'{what}_source']}, {entry[f'{what}_as_of']}{verified}"


def resolve_prices(
    datasheet_key: str | None,
    *,
    price_per_hour: float | None = None,
    instance: str | None = None,
    purchase_price: float | None = None,
    years: float = DEFAULT_YEARS,
    utilization: float = DEFAULT_UTILIZATION,
    kwh_price: float | None = None,
    devices: int = 1,
) -> Prices:
    """Per-device prices: a given figure > an ``instance`` of the table > the table's entry for the
    GPU ``datasheet_key`` (None for a CPU); what is missing says how to give it."""
    hourly, hourly_source = None, "no price (give --price-per-hour or --instance; --list-prices)"
    gpu = gpu_prices(datasheet_key) if datasheet_key else None
    if price_per_hour is not None:
        hourly, hourly_source = price_per_hour, "--price-per-hour"
    elif instance is not None:
        entry = price_table()["instances"].get(instance)
        if entry is None:
            raise UserError(f"unknown instance {instance!r}; known: {', '.join(instance_names())}")
        per_device = entry.get("gpus", 1)
        hourly = entry["usd_per_hour"] / per_device
        share = f" ÷ {per_device} GPUs" if per_device > 1 else ""
        hourly_source = f"{instance} on-demand{share}: {_cited(entry, 'hourly')}"
    elif gpu is not None and gpu.get("usd_per_hour") is not None:
        hourly, hourly_source = gpu["usd_per_hour"], f"{gpu['hourly_instance']}: {_cited(gpu, 'hourly')}"
    purchase, purchase_source = None, "no purchase price (give --purchase-price)"
    if purchase_price is not None:
        purchase, purchase_source = purchase_price, "--purchase-price"
    elif gpu is not None and gpu.get("purchase_usd") is not None:
        purchase, purchase_source = gpu["purchase_usd"], f"estimate: {_cited(gpu, 'purchase')}"
    kwh = (DEFAULT_KWH_PRICE, "assumed (--kwh-price)") if kwh_price is None else (kwh_price, "--kwh-price")
    return Prices(hourly, hourly_source, purchase, purchase_source, years, utilization, *kwh, devices)


def prices_table():  # -> rich.table.Table
    """The shipped prices, for ``--list-prices``: per GPU, then per instance, each with its source."""
    from rich.table import Table

    table = Table(title="prices (USD): hardware/prices.json", header_style="bold")
    for col in ("device / instance", "$/hour", "purchase $", "hourly source", "purchase source"):
        table.add_column(col, overflow="fold")
    for key, e in price_table()["gpus"].items():
        hourly = e.get("usd_per_hour")
        table.add_row(
            key,
            "—" if hourly is None else f"{hourly:,.4g} ({e['hourly_instance']})",
            "—" if e.get("purchase_usd") is None else f"{e['purchase_usd']:,} (estimate)",
            _cited(e, "hourly") if hourly is not None else "",
            _cited(e, "purchase") if e.get("purchase_usd") is not None else "",
        )
    for name, e in price_table()["instances"].items():
        gpus = f", {e['gpus']} × {e['gpu']}" if e.get("gpus") else ""
        table.add_row(
            f"{name}{gpus}", f"{e['usd_per_hour']:,.4g}", "—", _cited(e, "hourly"), e.get("note", "")
        )
    return table
