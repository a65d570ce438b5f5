"""The command line: ``python -m moecap_kernels.profile``.

Exit codes (``exits``): 0 done; 2 bad input (an unknown model, a malformed file, an impossible shape
or flag, a layer too big for the device), with one line on stderr; 130 Ctrl-C, at any moment, with
``moecap: interrupted``; 1 a bug in this package, with one line (``MOECAP_TRACEBACK=1`` shows the
traceback). The arguments, the output paths and the cache folder are checked before torch is
imported and before any row runs; ``--dry-run`` stops once everything is resolved, before the layer
is allocated.
"""

from __future__ import annotations

import argparse
import functools
import re
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from moecap_kernels import limits
from moecap_kernels.errors import UserError
from moecap_kernels.exits import Interrupt, run_cli
from moecap_kernels.files import check_cache_root, check_writable
from moecap_kernels.quant.formats import ALL_FORMATS

if TYPE_CHECKING:  # imported at run time only once the arguments are known to be good
    import torch
    from rich.console import Console

    from moecap_kernels import hardware
    from moecap_kernels.cost import Prices
    from moecap_kernels.runner import ProfileRequest, RowResult, Scenario
    from moecap_kernels.spec import MoESpec

DEFAULT_MODEL = "qwen3-30b-a3b"
DEFAULT_BATCHES = {"decode": [1, 8, 64], "prefill": [1]}
DEFAULT_SEQ_LEN = 512
DEFAULT_REPS = {"cpu": (2, 15), "cuda": (10, 100)}  # (warm-up, repetitions)
SI = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12, "p": 1e15}


# --- stage 1: the arguments, without torch ------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse would print usage too)
        raise UserError(message)


def _shown(text: str) -> str:
    return repr(text if len(text) <= 40 else text[:37] + "...")


def text_arg(text: str) -> str:
    """Any non-empty string (an empty --model would silently mean the default one)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a value, got an empty string")
    return text


def bounded(convert: Callable[[str], float], low: float, high: float, what: str) -> Callable[[str], float]:
    """An argparse type: ``convert(text)`` from ``low`` to ``high``; ``what`` names it in the message."""

    def parse(text: str) -> float:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {_shown(text)}") from None
        if not low <= value <= high:  # NaN fails too
            span = f"{_number(low)} to {_number(high)}"
            raise argparse.ArgumentTypeError(f"expected {what} from {span}, got {_shown(text)}")
        return value

    return parse


def _number(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:g}"


def integer(low: int, high: int) -> Callable[[str], int]:
    """An argparse type: an integer from ``low`` to ``high``."""
    return bounded(int, low, high, "an integer")


def integer_list(low: int, high: int) -> Callable[[str], list[int]]:
    """An argparse type: comma-separated integers, each from ``low`` to ``high``."""
    one = integer(low, high)

    def parse(text: str) -> list[int]:
        values = [one(v) for v in text.split(",") if v.strip()]
        if not values:
            raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {_shown(text)}")
        return values

    return parse


def rate(bounds: tuple[float, float], unit: str) -> Callable[[str], float]:
    """An argparse type: ``45e9``, ``45G``, ``3.35T`` or ``3.35 TB/s``, within plausible ``bounds``."""

    def parse(text: str) -> float:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([kKmMgGtTpP]?)\S*\s*", text)
        if not match:
            raise argparse.ArgumentTypeError(f"not a rate: {_shown(text)} (try 3.35e12 or 3.35T)")
        value = float(match[1]) * SI[match[2].lower()]
        problem = limits.implausible("a peak of", value, bounds, unit)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return value

    return parse


def amount(low: float, high: float, what: str) -> Callable[[str], float]:
    """An argparse type: a number (a leading ``$`` allowed) from ``low`` to ``high``, ``what`` its unit."""
    return bounded(lambda text: float(text.strip().lstrip("$")), low, high, what)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m moecap_kernels.profile",
        description="Profile one MoE layer: exact expert activation counts, S-MBU and S-MFU.",
    )
    src = p.add_argument_group("layer")
    src.add_argument(
        "--model", type=text_arg, help=f"a shipped preset (--list-models); default {DEFAULT_MODEL}"
    )
    src.add_argument("--config", type=text_arg, help="a local Hugging Face config.json (or its folder)")
    src.add_argument(
        "--weights",
        type=text_arg,
        help="a local safetensors checkpoint folder: profile one of its layers with its real weights",
    )
    src.add_argument(
        "--layer", type=integer(0, 1 << 20), help="with --weights: the MoE layer (default: the first one)"
    )
    src.add_argument("--list-models", action="store_true", help="list the shipped presets and exit")
    src.add_argument("--dtype", type=text_arg, help="bfloat16 | float16 | float32 (default: the model's)")
    run = p.add_argument_group("scenario")
    run.add_argument("--phase", choices=("decode", "prefill"), default="decode")
    run.add_argument(
        "--batch",
        type=integer_list(1, limits.MAX_TOKENS),
        help="comma list; decode default 1,8,64, prefill 1",
    )
    run.add_argument(
        "--seq-len",
        type=integer(1, limits.MAX_TOKENS),
        help=f"prefill tokens per sequence (default {DEFAULT_SEQ_LEN})",
    )
    run.add_argument(
        "--routing",
        type=text_arg,
        default="router",
        help="router | uniform | zipf:ALPHA | dirichlet:ALPHA | hot:N | trace:PATH.npy",
    )
    run.add_argument("--seed", type=integer(0, limits.MAX_SEED), default=0)
    src.add_argument(
        "--quant",
        type=text_arg,
        help="comma list of expert weight formats, each its own rows, or all: none, int8, w8a8, "
        "int4-gN, int4-gN-zp, fp8-tensor, fp8-channel, fp8-block, mxfp4 (default: the checkpoint's)",
    )
    how = p.add_argument_group("execution")
    how.add_argument("--backend", type=text_arg, default="all", help="comma list of backends, or all")
    how.add_argument(
        "--list-backends", action="store_true", help="list backends and where they run, and exit"
    )
    how.add_argument("--device", type=text_arg, default="auto", help="auto | cpu | cuda | cuda:N")
    how.add_argument(
        "--warmup", type=integer(0, limits.MAX_WARMUP), help="untimed runs first (default cpu 2, cuda 10)"
    )
    how.add_argument(
        "--reps", type=integer(1, limits.MAX_REPS), help="timed repetitions (default cpu 15, cuda 100)"
    )
    how.add_argument("--no-accuracy", action="store_true", help="skip the float64 reference check")
    how.add_argument(
        "--eager",
        action="store_true",
        help="CUDA: time eager launches only (by default graph-safe backends are timed by graph replays)",
    )
    how.add_argument(
        "--audit",
        action="store_true",
        help="CUDA: one forward of each row under Nsight Compute (ncu): DRAM bytes read and written "
        "beside the counted compulsory bytes",
    )
    how.add_argument(
        "--no-energy",
        action="store_true",
        help="skip the energy counters (NVML on CUDA, RAPL on CPU) and their ≥ 1 s loop per row",
    )
    how.add_argument(
        "--dry-run",
        action="store_true",
        help="print the resolved layer, scenarios, backends, peaks and memory, then exit",
    )
    peaks = p.add_argument_group("peaks (denominators)")
    peaks.add_argument(
        "--list-devices", action="store_true", help="print the datasheet table of peaks and exit"
    )
    peaks.add_argument(
        "--calibrate",
        action="store_true",
        help="measure this machine's bandwidth and GEMM peak now (cached when stable) and use them",
    )
    peaks.add_argument(
        "--peak-bandwidth", type=rate(limits.PLAUSIBLE_BANDWIDTH, "B/s"), help="bytes/s, e.g. 4.8e12 or 4.8T"
    )
    peaks.add_argument(
        "--peak-flops",
        type=rate(limits.PLAUSIBLE_FLOPS, "FLOP/s"),
        help="FLOP/s of the compute dtype, e.g. 989T",
    )
    ep = p.add_argument_group("expert parallelism")
    ep.add_argument(
        "--ep",
        type=integer(1, limits.MAX_EXPERTS),
        help="N ranks on torch.distributed (gloo on CPU, NCCL on CUDA), each owning its T tokens; "
        "started here unless torchrun started this process",
    )
    ep.add_argument(
        "--placement",
        type=text_arg,
        help='a JSON {"expert_ranks": [[rank, ...], ...]} (default: E/N contiguous experts per rank)',
    )
    ep.add_argument(
        "--ep-timeout",
        type=integer(1, 86400),
        default=300,
        help="seconds a rank waits in a collective before it gives up (default 300)",
    )
    ep.add_argument(
        "--project-ep",
        type=integer_list(1, limits.MAX_EXPERTS),
        help="PROJECTED: comma list of rank counts N; counts the exact traffic of N ranks on the routing "
        "and projects dispatch/combine time on --link, beside the busiest rank's expert time measured here",
    )
    ep.add_argument(
        "--link", type=text_arg, help="with --project-ep: comma list of links (nvlink4, ib-ndr, …)"
    )
    ep.add_argument(
        "--link-bandwidth",
        type=rate(limits.PLAUSIBLE_BANDWIDTH, "B/s"),
        help="with --project-ep: one-way bytes/s replacing each link's (or a link of its own)",
    )
    ep.add_argument(
        "--link-latency",
        type=float,
        help="with --project-ep: seconds per message replacing each link's assumed latency",
    )
    off = p.add_argument_group("routing over time, offloaded experts")
    off.add_argument(
        "--steps",
        type=integer(1, 1 << 16),
        help="decode steps of a synthetic routing sequence (default 64); with --offload or --trace-stats",
    )
    off.add_argument(
        "--trace-stats", action="store_true", help="statistics of the routing sequence, per layer"
    )
    off.add_argument(
        "--offload",
        choices=("disk",),
        help="experts in a file on disk, --cache-experts of them in memory; each step fetches its misses",
    )
    off.add_argument(
        "--cache-experts", type=integer_list(0, limits.MAX_EXPERTS), help="C[,C…] (default E/8,E/4,E/2)"
    )
    off.add_argument("--policy", type=text_arg, help="lru, lfu, belady (comma list) or all (default)")
    off.add_argument(
        "--offload-dir", type=text_arg, help="folder of the experts file (default: the temp folder)"
    )
    off.add_argument(
        "--keep-page-cache", action="store_true", help="read through the page cache without dropping it"
    )
    off.add_argument(
        "--trace-layer", type=integer(0, 1 << 20), help="the layer of a .npz sequence to offload"
    )
    cost = p.add_argument_group("cost ($ per million tokens)")
    cost.add_argument(
        "--price-per-hour", type=amount(0, 1e4, "USD per device-hour"), help="USD per device-hour (rental)"
    )
    cost.add_argument("--instance", type=text_arg, help="price the device as this instance of --list-prices")
    cost.add_argument(
        "--purchase-price", type=amount(0, 1e7, "USD per device"), help="USD per device (ownership)"
    )
    cost.add_argument(
        "--years", type=amount(0.1, 20, "years"), default=4.0, help="ownership: amortised over (default 4)"
    )
    cost.add_argument(
        "--utilization",
        type=amount(0.01, 1, "a fraction"),
        default=0.5,
        help="ownership: busy fraction of those years (default 0.5)",
    )
    cost.add_argument(
        "--kwh-price", type=amount(0, 10, "USD per kWh"), help="USD per kWh of measured energy (default 0.10)"
    )
    cost.add_argument("--list-prices", action="store_true", help="print the shipped prices table and exit")
    out = p.add_argument_group("output")
    out.add_argument("--json", help="write results as JSON (atomically)")
    out.add_argument("--csv", help="write results as CSV (atomically)")
    out.add_argument("--radar", help="draw the CAP radar of the rows: out.png or out.svg (needs matplotlib)")
    out.add_argument(
        "--roofline",
        help="draw the rows on the roofline of their peaks: out.png or out.svg (needs matplotlib)",
    )
    return p


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The arguments, every check that needs no torch done: bounds, combinations, output paths."""
    args = build_parser().parse_args(argv)
    if args.model and args.config:
        raise UserError("give --model or --config, not both")
    if args.weights is not None:
        if args.model:
            raise UserError(
                "--weights reads its layer's shape from a config.json: give --config or none, not --model"
            )
        if not Path(args.weights).expanduser().is_dir():
            raise UserError(f"--weights {args.weights}: not a folder")
    elif args.layer is not None:
        raise UserError("--layer picks a layer of --weights; give --weights too")
    if args.phase == "decode" and args.seq_len is not None:
        raise UserError("--seq-len applies to --phase prefill only")
    if args.phase == "prefill":
        tokens = max(args.batch or [1]) * (args.seq_len or DEFAULT_SEQ_LEN)
        if tokens > limits.MAX_TOKENS:
            raise UserError(
                f"batch × seq-len = {tokens} tokens per forward; the limit is {limits.MAX_TOKENS}"
            )
    if args.quant is not None:
        args.quant = format_names(args.quant)
    sequence_mode = args.offload is not None or args.trace_stats
    offload_flags = (args.steps, args.cache_experts, args.policy, args.offload_dir, args.trace_layer)
    if not sequence_mode and (any(v is not None for v in offload_flags) or args.keep_page_cache):
        raise UserError(
            "--steps, --cache-experts, --policy, --offload-dir, --keep-page-cache and "
            "--trace-layer apply to --offload or --trace-stats only"
        )
    if sequence_mode and (args.ep is not None or args.project_ep is not None):
        raise UserError("--offload/--trace-stats and expert parallelism do not combine yet")
    if sequence_mode and args.batch is not None and len(args.batch) > 1:
        raise UserError("a routing sequence has one T: give one --batch")
    if args.placement is not None and args.ep is None and args.project_ep is None:
        raise UserError("--placement places experts on ranks; give --ep or --project-ep too")
    if args.project_ep is not None and args.ep is not None:
        raise UserError("give --ep (a real run) or --project-ep (a projection), not both")
    link_flags = (args.link, args.link_bandwidth, args.link_latency)
    if args.project_ep is None and any(v is not None for v in link_flags):
        raise UserError("--link, --link-bandwidth and --link-latency apply to --project-ep only")
    if args.link_latency is not None and not 0 <= args.link_latency <= 1:
        raise UserError(f"--link-latency {args.link_latency:g}: expected seconds from 0 to 1")
    pictures = {"--radar": args.radar, "--roofline": args.roofline}
    profile_only = {**pictures, "--price-per-hour": args.price_per_hour, "--instance": args.instance,
                    "--purchase-price": args.purchase_price, "--kwh-price": args.kwh_price}  # fmt: skip
    given_flags = [flag for flag, value in profile_only.items() if value is not None]
    if given_flags and (sequence_mode or args.ep is not None or args.project_ep is not None):
        raise UserError(
            f"{given_flags[0]} applies to a profile's rows, not to --ep, --project-ep or --offload"
        )
    if args.price_per_hour is not None and args.instance is not None:
        raise UserError("give --price-per-hour or --instance, not both")
    for flag, path in pictures.items():
        if path is not None:
            from moecap_kernels.plots import check_plot_path

            check_plot_path(path, flag)
    given = {"--json": args.json, "--csv": args.csv, **pictures}
    outputs = [check_writable(path, flag) for flag, path in given.items() if path is not None]
    if len({p.resolve() for p in outputs}) < len(outputs):
        raise UserError("two of --json, --csv, --radar and --roofline name the same file")
    check_cache_root()
    return args


def format_names(text: str) -> tuple[str, ...]:
    """``--quant``'s weight formats, canonical and deduplicated (``all``: one of each kind)."""
    from moecap_kernels.quant.formats import weight_format

    if text.strip().lower() == "all":
        return ALL_FORMATS
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise UserError("--quant needs at least one weight format")
    return tuple(dict.fromkeys(weight_format(n).name for n in names))


# --- stage 2: resolving the run ----------------------------------------------------------------


def resolve_device(text: str) -> torch.device:
    import torch

    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except RuntimeError:
        raise UserError(f"unknown device {text!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise UserError(f"unsupported device {text!r}; use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise UserError(f"device {text!r} asked for, but torch sees no CUDA GPU here")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(
            f"device {text!r} does not exist; this machine has {torch.cuda.device_count()} GPU(s)"
        )
    return device


def resolve_spec(args: argparse.Namespace) -> tuple[MoESpec, dict[str, str]]:
    """The layer, and for each of its fields where it came from."""
    from dataclasses import fields

    from moecap_kernels.dtypes import canonical_dtype
    from moecap_kernels.hf_config import read_hf_config
    from moecap_kernels.spec import load_preset

    dtype = canonical_dtype(args.dtype) if args.dtype is not None else None
    if args.config or args.weights:
        return read_hf_config(args.config or args.weights, dtype)
    name = args.model or DEFAULT_MODEL
    spec = load_preset(name)
    origins = {f.name: f"preset {name}" for f in fields(spec)}
    if dtype is None:
        return spec, origins
    return spec.with_dtype(dtype), {**origins, "weight_dtype": "--dtype", "act_dtype": "--dtype"}


def resolve_layer(args: argparse.Namespace) -> tuple[Path | None, int]:
    """(the checkpoint folder, the MoE layer to load from it), or (None, 0) for random weights."""
    if args.weights is None:
        return None, 0
    from moecap_kernels.checkpoint import moe_layers, open_checkpoint

    folder = Path(args.weights).expanduser()
    layers = moe_layers(open_checkpoint(folder))
    if not layers:
        raise UserError(f"--weights {folder}: no MoE layer found (no router tensor under a known name)")
    if args.layer is None:
        return folder, layers[0]
    if args.layer not in layers:
        shown = ", ".join(map(str, layers[:12])) + (" ..." if len(layers) > 12 else "")
        raise UserError(f"--layer {args.layer}: not an MoE layer of {folder}; its MoE layers are {shown}")
    return folder, args.layer


def resolve_scenarios(args: argparse.Namespace, spec: MoESpec) -> tuple[Scenario, ...]:
    from moecap_kernels.routing import check_routing, load_trace, parse_routing
    from moecap_kernels.runner import Scenario

    choice = parse_routing(args.routing)
    check_routing(choice, spec)
    if choice.kind == "trace":
        rows, ranks = int(load_trace(choice.path, spec).shape[0]), args.ep or 1
        if rows % ranks:
            raise UserError(f"the trace's {rows} tokens do not split evenly over --ep {ranks} ranks")
        return (trace_scenario(args, rows // ranks),)
    batches = args.batch or DEFAULT_BATCHES[args.phase]
    seq_len = args.seq_len or DEFAULT_SEQ_LEN
    return tuple(Scenario(args.phase, b, seq_len if args.phase == "prefill" else 1) for b in batches)


def trace_scenario(args: argparse.Namespace, tokens: int) -> Scenario:
    """A trace fixes T; --batch / --seq-len may restate it but never contradict it."""
    from moecap_kernels.runner import Scenario

    batches = args.batch or [tokens if args.phase == "decode" else 1]
    batch = batches[0]
    seq_len = 1 if args.phase == "decode" else (args.seq_len or max(tokens // batch, 1))
    if len(batches) > 1 or batch * seq_len != tokens:
        raise UserError(
            f"the trace has T={tokens} tokens, but --batch/--seq-len ask for another T: drop them"
        )
    return Scenario(args.phase, batch, seq_len)


def resolve_formats(args: argparse.Namespace, spec: MoESpec) -> tuple[str, ...]:
    """The weight formats to profile (default: the spec's own); a shape a format cannot store is
    refused here, in one line."""
    formats = args.quant or (spec.weight_format,)
    for name in formats:
        spec.with_format(name)  # raises UserError when the groups do not divide the layer
    return formats


def resolve_backends(
    text: str, device: torch.device, spec: MoESpec, formats: tuple[str, ...] = ()
) -> tuple[tuple[str, ...], dict[str, str]]:
    """(the backends that will run, {backend left out of "all": why}). A backend runs the weight
    formats it computes (``ProfileRequest.backends_for``); every format must have one."""
    from moecap_kernels.backends import backend_names, get_backend
    from moecap_kernels.dtypes import torch_dtype

    formats = formats or (spec.weight_format,)
    every = text.strip() == "all"
    names = backend_names() if every else [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise UserError("--backend needs at least one name")
    chosen, skipped, covered = [], {}, set()
    for name in dict.fromkeys(names):
        backend = get_backend(name)
        why_not = backend.availability(device, torch_dtype(spec.act_dtype))
        unable = {f: backend.supports(spec.with_format(f)) for f in formats}
        runs = [f for f, why in unable.items() if why is None]
        if why_not is None and runs:
            chosen.append(name)
            covered.update(runs)
        elif every:
            skipped[name] = why_not or next(why for why in unable.values() if why)
        else:
            raise UserError(f"backend {name!r} cannot run here: {why_not or next(iter(unable.values()))}")
    missing = [f for f in formats if f not in covered]
    if not chosen or missing:
        what = f" in weight format {', '.join(missing)}" if missing and chosen else ""
        raise UserError(
            f"no chosen backend can run {spec.name}{what} on {device} with {spec.act_dtype} "
            "(--list-backends says which weight formats each computes)"
        )
    return tuple(chosen), skipped


def _calibration_wanted(args: argparse.Namespace, info: hardware.DeviceInfo, dtypes: Sequence[str]) -> bool:
    """Whether a measured figure may divide: --calibrate, or a figure neither given nor in a datasheet
    (--peak-flops gives the activations' dtype only: an int8 peak comes from elsewhere)."""
    from moecap_kernels import hardware

    overridden = args.peak_bandwidth is not None and args.peak_flops is not None and "int8" not in dtypes
    entry = hardware.datasheet_entry(info.name) if info.kind == "cuda" else None
    known_gpu = entry is not None and all(entry.peak_flops(d) is not None for d in dtypes)
    return args.calibrate or not (overridden or known_gpu)


def _peaks(
    args: argparse.Namespace, info: hardware.DeviceInfo, dtype: str, calibration: hardware.Calibration | None
) -> hardware.Peaks:
    """The peaks for compute ``dtype``; --peak-flops is the activations' dtype's (not int8's)."""
    from moecap_kernels import hardware

    return hardware.resolve_peaks(
        info,
        dtype,
        calibration=calibration,
        peak_bandwidth=args.peak_bandwidth,
        peak_flops=args.peak_flops if dtype != "int8" else None,
        prefer_measured=args.calibrate,
    )


def resolve_peaks(
    args: argparse.Namespace,
    device: torch.device,
    info: hardware.DeviceInfo,
    dtypes: Sequence[str],
    say: Callable[[str], None],
) -> dict[str, hardware.Peaks]:
    """{compute dtype: peaks}: datasheet (known GPU), measured (CPU, unknown GPU, --calibrate), or
    given (--peak-*)."""
    from moecap_kernels import hardware

    calibration = None
    if _calibration_wanted(args, info, dtypes):
        calibration = hardware.calibrate(device, list(dtypes), force=args.calibrate, announce=say)
    return {dtype: _peaks(args, info, dtype, calibration) for dtype in dtypes}


def planned_peaks(
    args: argparse.Namespace, info: hardware.DeviceInfo, dtypes: Sequence[str]
) -> tuple[dict[str, hardware.Peaks], str]:
    """What ``resolve_peaks`` would use, without measuring: (peaks, "") or ({}, what it would do)."""
    from moecap_kernels import hardware

    calibration = None
    if _calibration_wanted(args, info, dtypes):
        if args.calibrate:
            return {}, "measured at the start of the run (--calibrate)"
        calibration, why = hardware.cached_calibration(info, list(dtypes))
        if calibration is None:
            return {}, f"measured at the start of the run ({why})"
    return {dtype: _peaks(args, info, dtype, calibration) for dtype in dtypes}, ""


def list_models(console: Console) -> None:
    from rich.table import Table

    from moecap_kernels.spec import list_presets, load_preset

    table = Table(title="shipped presets")
    for col in ("model", "H", "F", "E", "k", "shared", "scoring", "params/layer", "source"):
        table.add_column(col, overflow="fold")
    for name in list_presets():
        s = load_preset(name)
        shared = f"{s.num_shared_experts}×{s.shared_intermediate_size}" if s.num_shared_experts else "—"
        table.add_row(
            name,
            str(s.hidden_size),
            str(s.intermediate_size),
            str(s.num_experts),
            str(s.top_k),
            shared,
            s.router_scoring,
            f"{s.total_params / 1e6:,.0f} M",
            s.source,
        )
    console.print(table)


def list_backends(console: Console, device: torch.device) -> None:
    import torch

    from moecap_kernels.backends import backend_names, get_backend

    for name in backend_names():
        backend = get_backend(name)
        why_not = backend.availability(device, torch.bfloat16)
        where = "available" if why_not is None else f"unavailable: {why_not}"
        formats = ", ".join(backend.weight_formats)
        status = f"[dim]({device.type}: {where})[/dim]"
        console.print(f"[bold]{name}[/bold]  {backend.description}; experts: {formats}  {status}")


def _console() -> Console:
    from rich.console import Console

    console = Console()
    return console if console.is_terminal else Console(width=180)  # piped: rows stay on one line


def _import_stage_two() -> None:
    """Everything ``run`` uses, imported up front while Ctrl-C is held back (``_Interrupt.deferred``)."""
    import importlib

    for name in ("torch", "rich.console", "rich.progress", "rich.table", "moecap_kernels.dry_run"):
        importlib.import_module(name)
    from moecap_kernels.backends import backend_names

    backend_names()  # imports every backend's module


def run(args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    with Interrupt.deferred():
        _import_stage_two()
    console = _console()
    if args.list_models:
        list_models(console)
        return 0
    if args.list_devices:
        from moecap_kernels.hardware import format_datasheet

        console.print(format_datasheet(), markup=False, highlight=False)
        return 0
    if args.list_prices:
        from moecap_kernels.cost import prices_table

        console.print(prices_table())
        return 0
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from moecap_kernels import hardware
    from moecap_kernels._ext import extension_status
    from moecap_kernels.report import checkpoint_line, report_and_write
    from moecap_kernels.routing import parse_routing
    from moecap_kernels.runner import ProfileRequest, check_request_fits, run_profile

    device = resolve_device(args.device)
    if args.audit and device.type != "cuda":
        raise UserError("--audit reads a GPU's DRAM counters with Nsight Compute: it needs a CUDA device")
    if args.audit and (
        args.ep is not None or args.project_ep is not None or args.offload or args.trace_stats
    ):
        raise UserError("--audit applies to a profile's rows, not to --ep, --project-ep or --offload")
    if args.list_backends:
        list_backends(console, device)
        return 0
    spec, origins = resolve_spec(args)
    checkpoint, layer = resolve_layer(args)
    if args.offload is not None or args.trace_stats:
        return run_sequences(args, argv, spec, device, checkpoint, layer, console)
    scenarios = resolve_scenarios(args, spec)
    formats = resolve_formats(args, spec)
    backends, skipped = resolve_backends(args.backend, device, spec, formats)
    warmup_default, reps_default = DEFAULT_REPS[device.type]
    request = ProfileRequest(
        spec=spec,
        scenarios=scenarios,
        backends=backends,
        routing=parse_routing(args.routing),
        device=device,
        seed=args.seed,
        warmup=warmup_default if args.warmup is None else args.warmup,
        reps=reps_default if args.reps is None else args.reps,
        check_accuracy=not args.no_accuracy,
        checkpoint=checkpoint,
        layer=layer,
        formats=formats,
        measure_energy=not args.no_energy,
        cuda_graphs=not args.eager,
    )
    info = hardware.detect_device(device)
    prices = resolve_prices(args, info)
    dtypes = tuple(dict.fromkeys(spec.with_format(f).compute_dtype for f in formats))
    command = "python -m moecap_kernels.profile " + shlex.join(sys.argv[1:] if argv is None else list(argv))
    if args.project_ep is not None:
        from moecap_kernels.ep.cli import run_projection

        return run_projection(args, command, request, info, console)
    placement = None
    if args.ep is not None:
        from moecap_kernels.ep.cli import check_ep_fits, resolve_placement, run_expert_parallel
        from moecap_kernels.ep.launch import checks_memory, launched_rank, self_launch

        placement = resolve_placement(args, spec, args.ep)
        if not args.dry_run:
            if checks_memory():  # once, before any rank makes its layer (the others would count it)
                check_ep_fits(request, info, placement.ranks)
            if not launched_rank():  # the peaks of the whole machine, measured before the ranks share it
                peaks = resolve_peaks(args, device, info, dtypes, say=_dim_line(console))
                argv_list = sys.argv[1:] if argv is None else list(argv)
                return self_launch(placement.ranks, argv_list, info.cores, peaks)
            peaks_of = lambda console: resolve_peaks(args, device, info, dtypes, say=_dim_line(console))  # noqa: E731
            return run_expert_parallel(args, command, request, placement, peaks_of)
    if args.dry_run:
        from moecap_kernels.dry_run import print_plan

        peaks, pending = planned_peaks(args, info, dtypes)
        outputs = [path for path in (args.json, args.csv) if path]
        print_plan(console, request, origins, skipped, info, peaks, pending, outputs)
        if placement is not None:
            from moecap_kernels.ep.report import placement_line

            console.print(placement_line(placement), markup=False, highlight=False)
        return 0
    check_request_fits(request, info)
    peaks = resolve_peaks(args, device, info, dtypes, say=_dim_line(console))
    Interrupt.check()
    console.print(
        f"{spec.name}: {spec.unquantized_weight_bytes / 1e9:.2f} GB of weights in {spec.weight_dtype}"
        + "".join(
            f", {spec.with_format(f).total_weight_bytes / 1e9:.2f} GB in {f}" for f in formats if f != "none"
        )
        + f"; counting via {extension_status()}",
        style="dim",
        markup=False,
    )
    if spec.checkpoint_format:
        console.print(checkpoint_line(spec, formats), style="yellow", markup=False)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        rows_per_scenario = sum(len(request.backends_for(f)) for f in formats)
        task = progress.add_task("profiling", total=len(scenarios) * rows_per_scenario)

        def advance(row: object) -> None:
            Interrupt.check()
            progress.advance(task)

        rows = run_profile(request, info, peaks, on_row=advance)
    rows = [with_cost(row, prices) for row in rows]
    if args.audit:
        rows = [with_audit(row, request, console) for row in rows]
    report_and_write(rows, console, command, args.json, args.csv, pictures(args, rows))
    return 0


def resolve_prices(args: argparse.Namespace, info: hardware.DeviceInfo) -> Prices:
    """The prices of the device the rows run on: given, an --instance, or the table's for a GPU."""
    from moecap_kernels import cost, hardware

    entry = hardware.datasheet_entry(info.name) if info.kind == "cuda" else None
    return cost.resolve_prices(
        entry.key if entry is not None else None,
        price_per_hour=args.price_per_hour,
        instance=args.instance,
        purchase_price=args.purchase_price,
        years=args.years,
        utilization=args.utilization,
        kwh_price=args.kwh_price,
    )


def with_cost(row: RowResult, prices: Prices) -> RowResult:
    """``row`` with its $/Mtok from its tokens/s, its measured energy and ``prices``."""
    import dataclasses

    from moecap_kernels.cost import cost_of

    joules = None if row.energy is None else row.energy.joules_per_token
    per = f"tokens through this one MoE layer ({row.spec.name}), at the row's T"
    return dataclasses.replace(row, cost=cost_of(row.tokens / row.time.median, joules, prices, per))


def with_audit(row: RowResult, request: ProfileRequest, console: Console) -> RowResult:
    """``row`` with the DRAM bytes ncu saw one of its forwards move (``audit``), or why not."""
    import dataclasses

    from moecap_kernels.audit import audit_row

    Interrupt.check()
    console.print(f"auditing {row.backend} T={row.tokens} under ncu…", style="dim", markup=False)
    found = audit_row(row.spec, row.backend, row.tokens, request.seed, str(request.device),
                      request.routing.describe())  # fmt: skip
    return dataclasses.replace(row, extras={**row.extras, "audit": found})


def pictures(args: argparse.Namespace, rows: Sequence[RowResult]) -> dict[str, bytes]:
    """{path: PNG or SVG bytes} of the --radar and --roofline asked for."""
    if not rows or (args.radar is None and args.roofline is None):
        return {}
    from moecap_kernels import plots

    drawn = {}
    for path, draw in ((args.radar, plots.radar), (args.roofline, plots.roofline)):
        if path is not None:
            drawn[path] = plots.render(draw(rows), path)
    return drawn


def run_sequences(
    args: argparse.Namespace,
    argv: Sequence[str] | None,
    spec: MoESpec,
    device: torch.device,
    checkpoint: Path | None,
    layer: int,
    console: Console,
) -> int:
    """``--trace-stats`` / ``--offload``: a routing sequence, its statistics, its offloaded run."""
    from moecap_kernels import hardware
    from moecap_kernels.backends import get_backend
    from moecap_kernels.ep.cli import fastest_backend
    from moecap_kernels.offload.cli import run_sequence_mode
    from moecap_kernels.routing import RoutingChoice
    from moecap_kernels.runner import ProfileRequest

    formats = resolve_formats(args, spec)
    if formats != ("none",):
        raise UserError("--offload keeps dense experts on disk; quantized formats are not offloaded yet")
    backends, _ = resolve_backends(args.backend, device, spec, formats)
    request = ProfileRequest(
        spec, (), backends, RoutingChoice("router"), device, args.seed, checkpoint=checkpoint, layer=layer
    )
    info = hardware.detect_device(device)

    def bandwidth() -> float:
        peaks = resolve_peaks(args, device, info, (spec.compute_dtype,), _dim_line(console))
        return peaks[spec.compute_dtype].bandwidth_bytes_per_s

    command = "python -m moecap_kernels.profile " + shlex.join(sys.argv[1:] if argv is None else list(argv))
    weights = functools.cache(request.layer_weights)
    if args.backend.strip() == "all":  # by default, a backend that reads the cache's slots in place
        backends = tuple(b for b in backends if not get_backend(b).copies_weights) or backends
    backend = fastest_backend(backends)
    return run_sequence_mode(args, command, spec, device, backend, weights, bandwidth, console)


def _dim_line(console: Console) -> Callable[[str], None]:
    def say(line: str) -> None:
        Interrupt.check()
        console.print(line, style="dim", markup=False)

    return say


def main(argv: Sequence[str] | None = None) -> int:
    """The CLI's exit code (see the module docstring); ``exits.run_cli`` turns failures into one line."""
    return run_cli(lambda: run(parse_args(argv), argv))


if __name__ == "__main__":
    raise SystemExit(main())
