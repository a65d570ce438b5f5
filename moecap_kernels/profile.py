"""The command line: ``python -m moecap_kernels.profile``.

Bad input (an unknown model, a malformed file, an impossible shape, a layer too big for the
device) ends with one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
from collections.abc import Sequence

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from moecap_kernels import hardware
from moecap_kernels._ext import extension_status
from moecap_kernels.backends import backend_names, get_backend
from moecap_kernels.dtypes import canonical_dtype, torch_dtype
from moecap_kernels.errors import UserError
from moecap_kernels.report import print_report, to_csv, to_json, write_atomic
from moecap_kernels.routing import load_trace, parse_routing
from moecap_kernels.runner import ProfileRequest, Scenario, run_profile
from moecap_kernels.spec import MoESpec, list_presets, load_preset

DEFAULT_MODEL = "qwen3-30b-a3b"
DEFAULT_BATCHES = {"decode": "1,8,64", "prefill": "1"}
DEFAULT_SEQ_LEN = 512
DEFAULT_REPS = {"cpu": (2, 15), "cuda": (10, 100)}  # (warm-up, repetitions)
SI = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12, "p": 1e15}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse would print usage too)
        raise UserError(message)


def parse_rate(text: str) -> float:
    """``45e9``, ``45G``, ``3.35T`` or ``3.35 TB/s`` → a positive float (units per second)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([kKmMgGtTpP]?)\S*\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"not a rate: {text!r} (try 3.35e12 or 3.35T)")
    value = float(match[1]) * SI[match[2].lower()]
    if value <= 0:
        raise argparse.ArgumentTypeError(f"a peak must be positive, got {text!r}")
    return value


def parse_int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m moecap_kernels.profile",
        description="Profile one MoE layer: exact expert activation counts, S-MBU and S-MFU.",
    )
    src = p.add_argument_group("layer")
    src.add_argument("--model", help=f"a shipped preset (see --list-models); default {DEFAULT_MODEL}")
    src.add_argument("--config", help="a local Hugging Face config.json to read the layer shape from")
    src.add_argument("--list-models", action="store_true", help="list the shipped presets and exit")
    src.add_argument("--dtype", help="bfloat16 | float16 | float32 (default: the model's, bfloat16)")
    run = p.add_argument_group("scenario")
    run.add_argument("--phase", choices=("decode", "prefill"), default="decode")
    run.add_argument("--batch", type=parse_int_list, help="comma list; decode default 1,8,64, prefill 1")
    run.add_argument(
        "--seq-len", type=non_negative_int, help=f"prefill tokens per sequence (default {DEFAULT_SEQ_LEN})"
    )
    run.add_argument(
        "--routing",
        default="router",
        help="router | uniform | zipf:ALPHA | dirichlet:ALPHA | hot:N | trace:PATH.npy",
    )
    run.add_argument("--seed", type=non_negative_int, default=0)
    how = p.add_argument_group("execution")
    how.add_argument(
        "--backend", default="all", help=f"comma list of backends, or all ({', '.join(backend_names())})"
    )
    how.add_argument(
        "--list-backends", action="store_true", help="list backends and where they run, and exit"
    )
    how.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    how.add_argument("--warmup", type=non_negative_int, help="untimed runs first (default cpu 2, cuda 10)")
    how.add_argument("--reps", type=non_negative_int, help="timed repetitions (default cpu 15, cuda 100)")
    how.add_argument("--no-accuracy", action="store_true", help="skip the float64 reference check")
    peaks = p.add_argument_group("peaks (denominators)")
    peaks.add_argument(
        "--list-devices", action="store_true", help="print the datasheet table of peaks and exit"
    )
    peaks.add_argument(
        "--calibrate",
        action="store_true",
        help="measure this machine's bandwidth and GEMM peak (cached) and use them",
    )
    peaks.add_argument("--peak-bandwidth", type=parse_rate, help="bytes/s, e.g. 4.8e12 or 4.8T")
    peaks.add_argument("--peak-flops", type=parse_rate, help="FLOP/s of the compute dtype, e.g. 989e12")
    out = p.add_argument_group("output")
    out.add_argument("--json", help="write results as JSON (atomically)")
    out.add_argument("--csv", help="write results as CSV (atomically)")
    return p


def resolve_device(text: str) -> torch.device:
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


def resolve_spec(args: argparse.Namespace) -> MoESpec:
    if args.model and args.config:
        raise UserError("give --model or --config, not both")
    if args.config:
        from moecap_kernels.hf_config import spec_from_hf_config

        spec = spec_from_hf_config(args.config)
    else:
        spec = load_preset(args.model or DEFAULT_MODEL)
    return spec.with_dtype(args.dtype) if args.dtype else spec


def resolve_scenarios(args: argparse.Namespace, spec: MoESpec) -> tuple[Scenario, ...]:
    choice = parse_routing(args.routing)
    if args.phase == "decode" and args.seq_len is not None:
        raise UserError("--seq-len applies to --phase prefill only")
    if args.seq_len == 0:
        raise UserError("--seq-len must be positive")
    if choice.kind == "trace":
        return (trace_scenario(args, int(load_trace(choice.path, spec).shape[0])),)
    batches = args.batch or parse_int_list(DEFAULT_BATCHES[args.phase])
    seq_len = args.seq_len or DEFAULT_SEQ_LEN
    return tuple(Scenario(args.phase, b, seq_len if args.phase == "prefill" else 1) for b in batches)


def trace_scenario(args: argparse.Namespace, tokens: int) -> Scenario:
    """A trace fixes T; --batch / --seq-len may restate it but never contradict it."""
    batches = args.batch or [tokens if args.phase == "decode" else 1]
    batch = batches[0]
    seq_len = 1 if args.phase == "decode" else (args.seq_len or max(tokens // batch, 1))
    if len(batches) > 1 or batch * seq_len != tokens:
        raise UserError(
            f"the trace has T={tokens} tokens, but --batch/--seq-len ask for another T: drop them"
        )
    return Scenario(args.phase, batch, seq_len)


def resolve_backends(text: str, device: torch.device, dtype: torch.dtype) -> tuple[str, ...]:
    names = backend_names() if text.strip() == "all" else [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise UserError("--backend needs at least one name")
    chosen = []
    for name in dict.fromkeys(names):
        why_not = get_backend(name).availability(device, dtype)
        if why_not is None:
            chosen.append(name)
        elif text.strip() != "all":
            raise UserError(f"backend {name!r} cannot run here: {why_not}")
    return tuple(chosen)


def resolve_peaks(
    args: argparse.Namespace, device: torch.device, info: hardware.DeviceInfo, dtype: str, console: Console
) -> hardware.Peaks:
    """Datasheet (known GPU), measured (CPU, unknown GPU, --calibrate), or given (--peak-*)."""
    overridden = args.peak_bandwidth is not None and args.peak_flops is not None
    known_gpu = info.kind == "cuda" and hardware.datasheet_entry(info.name) is not None
    calibration = None
    if args.calibrate or not (overridden or known_gpu):
        if args.calibrate or hardware.read_cache(info)[0] is None:
            console.print(
                f"[dim]calibrating {info.name}: read bandwidth and {dtype} GEMM peak (cached)…[/dim]"
            )
        calibration = hardware.calibrate(device, [dtype], force=args.calibrate)
    return hardware.resolve_peaks(
        info,
        dtype,
        calibration=calibration,
        peak_bandwidth=args.peak_bandwidth,
        peak_flops=args.peak_flops,
        prefer_measured=args.calibrate,
    )


def list_models(console: Console) -> None:
    from rich.table import Table

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
    for name in backend_names():
        backend = get_backend(name)
        why_not = backend.availability(device, torch.bfloat16)
        where = "available" if why_not is None else f"unavailable: {why_not}"
        console.print(f"[bold]{name}[/bold]  {backend.description}  [dim]({device.type}: {where})[/dim]")


def run(argv: Sequence[str] | None, console: Console) -> int:
    args = build_parser().parse_args(argv)
    if args.list_models:
        list_models(console)
        return 0
    if args.list_devices:
        console.print(hardware.format_datasheet(), markup=False, highlight=False)
        return 0
    device = resolve_device(args.device)
    if args.list_backends:
        list_backends(console, device)
        return 0
    if args.dtype:
        canonical_dtype(args.dtype)
    spec = resolve_spec(args)
    scenarios = resolve_scenarios(args, spec)
    backends = resolve_backends(args.backend, device, torch_dtype(spec.act_dtype))
    if not backends:
        raise UserError(f"no backend can run on {device} with {spec.act_dtype}")
    warmup_default, reps_default = DEFAULT_REPS[device.type]
    warmup = warmup_default if args.warmup is None else args.warmup
    reps = reps_default if args.reps is None else args.reps
    if reps < 1:
        raise UserError("--reps must be at least 1")
    info = hardware.detect_device(device)
    peaks = resolve_peaks(args, device, info, spec.act_dtype, console)
    request = ProfileRequest(
        spec=spec,
        scenarios=scenarios,
        backends=backends,
        routing=parse_routing(args.routing),
        device=device,
        seed=args.seed,
        warmup=warmup,
        reps=reps,
        check_accuracy=not args.no_accuracy,
    )
    console.print(
        f"[dim]{spec.name}: {spec.total_weight_bytes / 1e9:.2f} GB of weights in {spec.weight_dtype}; "
        f"counting via {extension_status()}[/dim]"
    )
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as progress:
        task = progress.add_task("profiling", total=len(scenarios) * len(backends))

        def advance(row: object) -> None:
            progress.advance(task)

        rows = run_profile(request, info, peaks, on_row=advance)
    print_report(rows, console)
    command = "python -m moecap_kernels.profile " + shlex.join(sys.argv[1:] if argv is None else list(argv))
    if args.json:
        write_atomic(args.json, to_json(rows, command))
    if args.csv:
        write_atomic(args.csv, to_csv(rows))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    console = Console()
    if not console.is_terminal:  # piped or captured: keep the table's rows on one line each
        console = Console(width=180)
    try:
        return run(argv, console)
    except UserError as exc:
        print(f"moecap: error: {exc}", file=sys.stderr)
        return 2
    except torch.OutOfMemoryError as exc:
        print(f"moecap: error: out of device memory: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    except OSError as exc:  # unwritable --json/--csv path, unreadable config
        print(f"moecap: error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("moecap: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
