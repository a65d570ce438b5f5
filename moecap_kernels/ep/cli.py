"""The command line's expert-parallel modes: ``--ep N`` on each rank, and ``--project-ep N,…``."""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.distributed as dist
from rich.console import Console

from moecap_kernels import hardware
from moecap_kernels.backends import PREFERRED_ORDER
from moecap_kernels.ep.launch import as_one_line, inherited_peaks, init_process_group
from moecap_kernels.ep.placement import Placement, contiguous, load_placement
from moecap_kernels.ep.project import project_ep, resolve_links
from moecap_kernels.ep.report import placement_line, print_projection
from moecap_kernels.ep.run import Ranks, run_ep_profile
from moecap_kernels.errors import UserError
from moecap_kernels.exits import Interrupt
from moecap_kernels.files import write_all_atomic
from moecap_kernels.report import report_and_write, to_json
from moecap_kernels.runner import ProfileRequest, fits, layer_weight_bytes, memory_needed
from moecap_kernels.spec import MoESpec

PeaksFor = Callable[[Console], dict[str, hardware.Peaks]]


def resolve_placement(args: argparse.Namespace, spec: MoESpec, ranks: int) -> Placement:
    """The expert → rank map for ``ranks`` ranks: ``--placement``, else contiguous; checked against
    the layer."""
    if args.placement is None:
        return contiguous(spec.num_experts, ranks)
    return load_placement(Path(args.placement).expanduser(), spec.num_experts, ranks)


def check_ep_fits(request: ProfileRequest, info: hardware.DeviceInfo, ranks: int) -> None:
    """Refuse, before any rank starts, a run whose ranks would not fit.

    Every rank makes the whole layer; rank 0 keeps it (and runs the single-process layer for the
    references), the others only their experts: on a CPU, where the ranks share the machine's
    memory, about ``need + (N − 1)·need / N`` for ``need`` the single-process row of N·T tokens, and
    never less than N layers at once while they are made.
    """
    for scenario in request.scenarios:
        need, _ = memory_needed(
            request.spec,
            scenario.tokens * ranks,
            request.check_accuracy,
            request.backends,
            request.weight_formats,
        )
        if info.kind == "cpu":
            made = ranks * layer_weight_bytes(request.spec, request.weight_formats)
            need = max(need + (ranks - 1) * need // ranks, made)
        if not fits(need, info):
            raise UserError(
                f"{request.spec.name} at --ep {ranks}, T = {scenario.tokens} per rank, needs about "
                f"{need / 2**30:.1f} GiB but {info.name} has {info.memory_available_bytes / 2**30:.1f} GiB "
                "available; pick a smaller model, batch, dtype or N"
            )


def run_expert_parallel(
    args: argparse.Namespace, command: str, request: ProfileRequest, placement: Placement, peaks_for: PeaksFor
) -> int:
    """This rank's part of an ``--ep`` run; rank 0 resolves the peaks, prints the report, writes files."""
    from moecap_kernels.profile import _console

    rank = int(os.environ["RANK"])
    with as_one_line(rank, args.ep_timeout):
        rank, device_name = init_process_group(placement.ranks, request.device.type, args.ep_timeout)
        device = torch.device(device_name)
        request = dataclasses.replace(request, device=device)
        info = hardware.detect_device(device)
        console = _console() if rank == 0 else Console(quiet=True)
        shared = device.type == "cpu" or torch.cuda.device_count() < placement.ranks
        ranks = Ranks(rank, placement.ranks, placement, device, shared)
        peaks = [(inherited_peaks() or peaks_for(console)) if rank == 0 else None]
        dist.broadcast_object_list(peaks)
        if rank == 0:
            console.print(placement_line(placement), style="dim", markup=False)
        rows = run_ep_profile(request, ranks, info, peaks[0], on_row=lambda row: Interrupt.check())
        if rank == 0:
            report_and_write(rows, console, command, args.json, args.csv)
    return 0


def fastest_backend(names: Sequence[str]) -> str:
    """The backend a projection times the experts with: the most optimised of ``names``."""
    ranked = {name: i for i, name in enumerate(reversed(PREFERRED_ORDER))}
    return min(names, key=lambda name: ranked.get(name, len(ranked)))


def run_projection(
    args: argparse.Namespace,
    command: str,
    request: ProfileRequest,
    info: hardware.DeviceInfo,
    console: Console,
) -> int:
    """``--project-ep``: the exact traffic for each N, dispatch and combine projected on each link."""
    names = [n.strip() for n in (args.link or "").split(",") if n.strip()]
    links = resolve_links(names, args.link_bandwidth, args.link_latency)
    placements = [resolve_placement(args, request.spec, n) for n in args.project_ep]
    for placement in placements:
        console.print(placement_line(placement), style="dim", markup=False)
    if args.dry_run:
        return 0
    fmt_request = request.in_format(request.weight_formats[0])
    backend = fastest_backend(request.backends_for(request.weight_formats[0]))
    records = []
    for scenario in request.scenarios:
        for placement in placements:
            Interrupt.check()
            per_rank = scenario.tokens
            if request.routing.kind == "trace":  # the trace holds the N·T tokens of one step
                if scenario.tokens % placement.ranks:
                    raise UserError(
                        f"the trace's {scenario.tokens} tokens do not split evenly over "
                        f"{placement.ranks} ranks"
                    )
                per_rank = scenario.tokens // placement.ranks
            records += project_ep(fmt_request, placement, per_rank, links, backend, info.name)
    print_projection(records, request.spec.name, console)
    if args.json:
        write_all_atomic({args.json: to_json([], command, ep_projection=records)})
    return 0
