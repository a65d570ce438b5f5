"""``--dry-run``: what a profile would do, printed before anything is allocated or timed.

The resolved layer (every MoESpec field and where it came from), the scenarios, the backends (and
why others are left out), the peaks that would divide, and the memory each row would need.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

from rich.console import Console
from rich.table import Table

from moecap_kernels.hardware import DeviceInfo, Peaks
from moecap_kernels.report import checkpoint_line, human_bytes, human_flops
from moecap_kernels.runner import ProfileRequest, fits, layer_weight_bytes, memory_needed

GiB = 2**30


def layer_table(request: ProfileRequest, origins: Mapping[str, str]) -> Table:
    spec = request.spec
    table = Table(title=f"layer {spec.name}", title_style="bold", header_style="bold")
    for column in ("field", "value", "from"):
        table.add_column(column, overflow="fold")
    for field in dataclasses.fields(spec):
        table.add_row(field.name, str(getattr(spec, field.name)), origins.get(field.name, "default"))
    table.add_row("[dim]params per expert[/dim]", f"{spec.params_per_expert:,}", "[dim]derived[/dim]")
    table.add_row("[dim]weights in all[/dim]", human_bytes(spec.total_weight_bytes), "[dim]derived[/dim]")
    return table


def peaks_line(peaks: Peaks | None, pending: str) -> str:
    if peaks is None:
        return f"peaks: {pending}"
    return (
        f"peaks: {human_bytes(peaks.bandwidth_bytes_per_s)}/s ({peaks.bandwidth_source}); "
        f"{human_flops(peaks.flops_per_s)}/s {peaks.dtype} ({peaks.flops_source})"
        + (f"; {peaks.caveat}" if peaks.caveat else "")
    )


def memory_lines(request: ProfileRequest, info: DeviceInfo) -> list[str]:
    lines = []
    for scenario in request.scenarios:
        need, extra = memory_needed(request.spec, scenario.tokens, request.check_accuracy, request.backends)
        verdict = "fits" if fits(need, info) else "would be refused: it does not fit"
        copies = f", backends' own copies {extra / GiB:.1f} GiB" if extra else ""
        lines.append(
            f"memory at T = {scenario.tokens}: about {need / GiB:.1f} GiB "
            f"(weights {layer_weight_bytes(request.spec) / GiB:.1f} GiB{copies}) of "
            f"{info.memory_available_bytes / GiB:.1f} GiB available on {info.name}: {verdict}"
        )
    return lines


def print_plan(
    console: Console,
    request: ProfileRequest,
    origins: Mapping[str, str],
    skipped: Mapping[str, str],
    info: DeviceInfo,
    peaks: Peaks | None,
    pending: str,
    outputs: Sequence[str],
) -> None:
    """Print the plan of ``request``; allocates nothing on the device."""
    console.print("dry run: nothing allocated, nothing timed", style="bold")
    console.print(layer_table(request, origins))
    tokens = ", ".join(str(s.tokens) for s in request.scenarios)
    lines = [
        f"scenarios: {request.scenarios[0].phase}, T = {tokens}; routing {request.routing.describe()}; "
        f"weights {request.weights_source}",
        f"backends: {', '.join(request.backends)}"
        + "".join(f"; not {name}: {why}" for name, why in skipped.items()),
        f"timing: {request.warmup} warm-up and {request.reps} timed forwards per row on {request.device}; "
        + ("accuracy against a float64 reference" if request.check_accuracy else "no accuracy check"),
        peaks_line(peaks, pending),
        *memory_lines(request, info),
    ]
    if request.spec.checkpoint_format:
        lines.append(checkpoint_line(request.spec))
    if outputs:
        lines.append(f"would write {', '.join(outputs)}")
    for line in lines:
        console.print(line, markup=False, highlight=False)
