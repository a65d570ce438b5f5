"""Runs a profile: for each scenario, weight format and backend, time the layer, count its routing,
check its accuracy.

Data flows one way: spec → routing → backend run (timed) + counters → metrics → RowResult. The
weight formats are the layer's experts quantized once each, before anything is timed; every format
sees the same inputs and the same routing (the router stays dense).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from moecap_kernels.backends import get_backend
from moecap_kernels.cost import Cost
from moecap_kernels.counters import CountAccumulator, Counts
from moecap_kernels.dtypes import torch_dtype
from moecap_kernels.energy import EnergyMeter, EnergyReading, energy_meter, measure_energy
from moecap_kernels.errors import UserError
from moecap_kernels.graphs import REPLAYS, Capture, capture_graphs, try_capture
from moecap_kernels.hardware import DeviceInfo, Peaks
from moecap_kernels.metrics import Traffic, Utilization, Work, load_imbalance, traffic, utilization, work
from moecap_kernels.nvtx import nvtx_range
from moecap_kernels.quant.layer import in_format
from moecap_kernels.reference import reference_forward, relative_error
from moecap_kernels.routing import RoutingChoice, load_trace, route_tokens, synthetic_ids
from moecap_kernels.spec import MoESpec
from moecap_kernels.timing import CacheFlusher, TimingStats, time_region
from moecap_kernels.weights import MoEWeights, random_weights

INPUT_COPIES = 4  # activations rotate through this many buffers holding the same values
FLUSH_BELOW_LLC_MULTIPLE = 4  # flush the cache between reps when the working set is below 4× LLC


@dataclass(frozen=True)
class Scenario:
    """One point of a sweep: decode (T = batch) or prefill (T = batch × seq_len)."""

    phase: str
    batch: int
    seq_len: int = 1

    @property
    def tokens(self) -> int:
        return self.batch if self.phase == "decode" else self.batch * self.seq_len


@dataclass(frozen=True)
class ProfileRequest:
    spec: MoESpec
    scenarios: tuple[Scenario, ...]
    backends: tuple[str, ...]
    routing: RoutingChoice
    device: torch.device
    seed: int = 0
    warmup: int = 3
    reps: int = 20
    check_accuracy: bool = True
    checkpoint: Path | None = None  # real weights: this layer of this safetensors folder; else random
    layer: int = 0
    formats: tuple[str, ...] = ()  # weight formats, each a set of rows; () = the spec's own
    measure_energy: bool = True  # read the energy counters around a ≥ 1 s loop after the timed reps
    cuda_graphs: bool = True  # on CUDA, time graph replays of graph-safe backends (kernel time)

    @property
    def weight_formats(self) -> tuple[str, ...]:
        return self.formats or (self.spec.weight_format,)

    def in_format(self, name: str) -> ProfileRequest:
        """The same request for the layer with its experts in weight format ``name``."""
        return dataclasses.replace(self, spec=self.spec.with_format(name), formats=(name,))

    def backends_for(self, name: str) -> tuple[str, ...]:
        """The request's backends that compute experts in weight format ``name``."""
        spec = self.spec.with_format(name)
        return tuple(b for b in self.backends if get_backend(b).supports(spec) is None)

    @property
    def weights_source(self) -> str:
        if self.checkpoint is None:
            return f"random (seed {self.seed})"
        return f"layer {self.layer} of {self.checkpoint}"

    def layer_weights(self) -> MoEWeights:
        """The layer's weights on the request's device: loaded from the checkpoint, or random."""
        if self.checkpoint is None:
            return random_weights(self.spec, self.device, seed=self.seed)
        from moecap_kernels.checkpoint import load_layer

        return load_layer(self.checkpoint, self.spec, self.layer, self.device)


@dataclass(frozen=True)
class RowResult:
    """Everything measured for one (scenario, backend)."""

    spec: MoESpec
    scenario: Scenario
    tokens: int
    backend: str
    device: DeviceInfo
    routing: str
    weights_source: str  # "random (seed S)" or "layer N of FOLDER"
    counts: Counts  # per forward
    bytes: Traffic
    flops: Work
    time: TimingStats
    peaks: Peaks
    util: Utilization
    rel_error: float | None  # against the float64 layer as profiled (quantized: dequantized weights)
    cache_flushed: bool
    counter_impl: str
    extras: dict[str, Any] = field(default_factory=dict)
    quant_rel_error: float | None = None  # against the float64 layer with the unquantized weights
    energy: EnergyReading | None = None  # measured by the counters, else None and why not:
    energy_unavailable: str = ""
    cost: Cost | None = None  # $/Mtok, attached once the prices are known (``cost.cost_of``)

    @property
    def imbalance(self) -> float:
        return load_imbalance(self.counts.tokens_per_expert)


def estimate_memory_bytes(
    spec: MoESpec, tokens: int, check_accuracy: bool, formats: tuple[str, ...] = ()
) -> int:
    """Upper estimate of what one row allocates: all weights (the layer, and its experts in each
    weight format), inputs, transients, the float64 reference."""
    b_a = spec.act_bytes_per_element
    pairs = tokens * spec.top_k
    activations = (INPUT_COPIES + 2) * tokens * spec.hidden_size * b_a
    transient = 3 * pairs * (spec.expert_in_rows + spec.hidden_size) * max(b_a, 4)
    reference = 0
    if check_accuracy:
        largest = max(spec.params_per_expert, spec.params_per_shared_expert)
        reference = 8 * largest + 8 * 4 * (pairs + tokens) * max(spec.expert_in_rows, spec.hidden_size)
    return layer_weight_bytes(spec, formats) + activations + transient + reference


def layer_weight_bytes(spec: MoESpec, formats: tuple[str, ...] = ()) -> int:
    """The weights a profile holds: the layer in ``weight_dtype`` and, beside it (for the reference of
    what compression costs), its experts in each quantized weight format (default: the spec's)."""
    names = formats or (spec.weight_format,)
    quantized = sum(spec.with_format(name).total_weight_bytes for name in names if name != "none")
    return spec.unquantized_weight_bytes + quantized


def memory_needed(
    spec: MoESpec,
    tokens: int,
    check_accuracy: bool,
    backends: tuple[str, ...] = (),
    formats: tuple[str, ...] = (),
) -> tuple[int, int]:
    """(bytes one row needs in all, of which the backends' own copies), estimated without allocating."""
    specs = [spec.with_format(name) for name in formats or (spec.weight_format,)]
    extra = max(
        sum(
            get_backend(name).extra_memory_bytes(s, tokens)
            for name in backends
            if get_backend(name).supports(s) is None
        )
        for s in specs
    )
    return estimate_memory_bytes(spec, tokens, check_accuracy, formats) + extra, extra


def fits(need: int, info: DeviceInfo) -> bool:
    """Whether ``need`` bytes leave a tenth of the device's free memory free."""
    return need <= 0.9 * info.memory_available_bytes


def check_fits(
    spec: MoESpec,
    tokens: int,
    info: DeviceInfo,
    check_accuracy: bool,
    backends: tuple[str, ...] = (),
    formats: tuple[str, ...] = (),
) -> None:
    """Refuse, before allocating anything, a row that would not fit in the device's free memory."""
    need, extra = memory_needed(spec, tokens, check_accuracy, backends, formats)
    if not fits(need, info):
        raise UserError(
            f"{spec.name} at {tokens} tokens needs about {need / 2**30:.1f} GiB "
            f"(weights {layer_weight_bytes(spec, formats) / 2**30:.1f} GiB"
            + (f", backends' own copies {extra / 2**30:.1f} GiB" if extra else "")
            + f") but {info.name} has "
            f"{info.memory_available_bytes / 2**30:.1f} GiB available; pick a smaller model, batch or dtype"
        )


def check_request_fits(request: ProfileRequest, info: DeviceInfo) -> None:
    """``check_fits`` for every scenario of ``request``."""
    for scenario in request.scenarios:  # a trace's T is already in its scenario (see profile.py)
        check_fits(
            request.spec,
            scenario.tokens,
            info,
            request.check_accuracy,
            request.backends,
            request.weight_formats,
        )


def forced_ids(choice: RoutingChoice, tokens: int, spec: MoESpec, seed: int) -> torch.Tensor | None:
    """The fixed expert ids of a synthetic or trace routing (CPU tensor), or None for the router."""
    if choice.kind == "router":
        return None
    if choice.kind == "trace":
        return load_trace(choice.path, spec)
    return synthetic_ids(choice, tokens, spec, seed)


class Row:
    """The inputs shared by every backend of one scenario: x copies, forced routing, reference."""

    def __init__(self, request: ProfileRequest, weights: MoEWeights, scenario: Scenario, tokens: int) -> None:
        spec, device = request.spec, request.device
        gen = torch.Generator(device=device).manual_seed(request.seed + tokens)
        x = torch.randn(tokens, spec.hidden_size, generator=gen, device=device, dtype=torch.float32)
        self.inputs = [x.to(torch_dtype(spec.act_dtype)) for _ in range(INPUT_COPIES)]
        forced = forced_ids(request.routing, tokens, spec, request.seed)
        self.forced = None if forced is None else forced.to(device)
        self.ids, self.topk_weights = route_tokens(self.inputs[0], weights, spec, self.forced)
        self._references: dict[str, torch.Tensor] = {}
        self._weights, self._spec = weights, spec

    def reference(self, weights: MoEWeights | None = None, spec: MoESpec | None = None) -> torch.Tensor:
        """The float64 output of the layer with its unquantized weights or, given the weights and
        spec of a quantized weight format, with that format's dequantized weights; each made once."""
        quantized = weights is not None and spec is not None and spec.fmt.quantized
        key = spec.weight_format if quantized else "unquantized"
        if key not in self._references:
            self._references[key] = reference_forward(
                self.inputs[0],
                weights if quantized else self._weights,
                spec if quantized else self._spec,
                self.ids,
                self.topk_weights,
                dequantized=quantized,
            )
        return self._references[key]


def _working_set_bytes(spec: MoESpec, row: Row) -> int:
    activated = int(torch.unique(row.ids).numel())
    return traffic(spec, row.ids.shape[0], activated * spec.expert_weight_bytes).compulsory


class BackendRun:
    """One backend on one scenario's inputs: call it with a repetition index to run one forward.

    Each call is the measured region: router, experts and combine, and (when ``count``) the
    device-side counting of its routed pairs. ``finish`` reads the counts once and builds the row.
    """

    def __init__(
        self, request: ProfileRequest, weights: MoEWeights, row: Row, backend_name: str, count: bool = True
    ) -> None:
        self.request, self.weights, self.row, self.name = request, weights, row, backend_name
        self.backend = get_backend(backend_name)
        self.backend.prepare(weights, request.spec, row.ids.shape[0])
        self.counter = CountAccumulator(request.spec, request.device) if count else None
        self.output: torch.Tensor | None = None

    def __call__(self, i: int) -> None:
        spec, device, weights = self.request.spec, self.request.device, self.weights
        x = self.row.inputs[i % INPUT_COPIES]
        with nvtx_range("router", device):
            ids, topk_weights = route_tokens(x, weights, spec, self.row.forced)
        self.output = self.backend.forward(x, weights, spec, ids, topk_weights)
        if self.counter is not None:
            self.counter.add(ids)

    def reset_counts(self) -> None:
        if self.counter is not None:
            self.counter.reset()

    def finish(
        self, scenario: Scenario, timing: TimingStats, info: DeviceInfo, peaks: Peaks, cache_flushed: bool
    ) -> RowResult:
        """Read the counts (one host sync) and derive bytes, FLOPs, utilization and accuracy."""
        spec = self.request.spec
        if self.counter is None:
            raise RuntimeError("a run without counters has no metrics")
        total = self.counter.read()
        if total.forwards != len(timing.samples_s):
            raise RuntimeError(f"counted {total.forwards} forwards, timed {len(timing.samples_s)}")
        counts = total.per_forward()
        if counts.invalid_ids:
            raise UserError(
                f"routing produced {counts.invalid_ids} expert ids outside [0, {spec.num_experts})"
            )
        tokens = self.row.ids.shape[0]
        bytes_ = traffic(spec, tokens, counts.expert_weight_bytes)
        flops = work(spec, tokens, counts.expert_flops)
        check = self.request.check_accuracy and self.output is not None
        extras = {}
        kernel = self.backend.kernel_counters(
            self.row.inputs[0], self.weights, spec, self.row.ids, self.row.topk_weights
        )
        if kernel is not None:
            extras["kernel"] = {
                **kernel,
                "padding_waste": kernel["executed_flops"] / (flops.experts + flops.shared),
                "load_amplification": kernel["issued_weight_bytes"]
                / (bytes_.expert_weights + bytes_.shared_weights),
            }
        return RowResult(
            spec=spec,
            scenario=scenario,
            tokens=tokens,
            backend=self.name,
            device=info,
            routing=self.request.routing.describe(),
            weights_source=self.request.weights_source,
            counts=counts,
            bytes=bytes_,
            flops=flops,
            time=timing,
            peaks=peaks,
            util=utilization(bytes_, flops, timing.median, peaks.bandwidth_bytes_per_s, peaks.flops_per_s),
            rel_error=relative_error(self.output, self.row.reference(self.weights, spec)) if check else None,
            cache_flushed=cache_flushed,
            counter_impl=self.counter.implementation,
            extras=extras,
            quant_rel_error=relative_error(self.output, self.row.reference()) if check else None,
        )


def needs_flush(spec: MoESpec, row: Row, info: DeviceInfo) -> bool:
    """True when one forward's compulsory bytes are small enough that caches would flatter the time."""
    return _working_set_bytes(spec, row) < FLUSH_BELOW_LLC_MULTIPLE * info.llc_bytes


def profile_row(
    request: ProfileRequest,
    weights: MoEWeights,
    row: Row,
    scenario: Scenario,
    backend_name: str,
    info: DeviceInfo,
    peaks: Peaks,
    flusher: Callable[[], CacheFlusher] | None = None,
    meter: tuple[EnergyMeter | None, str] = (None, "energy not asked for"),
    capture: Capture | None = None,
) -> RowResult:
    """Time one backend on one scenario (warm-up, then reps), and derive its metrics; then, when
    ``meter`` has counters, the energy of a loop of the same forwards spanning ≥ 1 s.

    ``flusher`` gives the cache flush to run between repetitions when the row needs one (default:
    a new one; ``run_profile`` makes one for all its rows, its buffer being up to 1 GiB).
    ``meter``: (the energy counters, "") or (None, why there are none). ``capture`` (CUDA:
    ``graphs.capture_graphs``): when given and the backend is graph-safe, the timed figure is of
    graph replays and the eager loop's goes to ``time_s_eager``; else why not, in ``cuda_graph``.
    """
    run = BackendRun(request, weights, row, backend_name)
    flush = needs_flush(request.spec, row, info)
    make = flusher or (lambda: CacheFlusher(info.llc_bytes, request.device))
    between = make() if flush else None
    timing = time_region(
        run, request.device, warmup=request.warmup, reps=request.reps, between=between,
        after_warmup=run.reset_counts,
    )  # fmt: skip
    graph_extras: dict[str, Any] = {}
    if capture is not None:
        replay, why_not = (None, "not captured: the backend waits for the host inside a forward")
        if run.backend.graph_safe:
            replay, why_not = try_capture(capture, run, INPUT_COPIES, request.device)
        if replay is None:
            graph_extras["cuda_graph"] = why_not
        else:  # the replays are the timed figure; their counts replace the eager loop's
            eager = timing
            timing = time_region(
                replay, request.device, warmup=min(request.warmup, 3), reps=request.reps, between=between,
                after_warmup=run.reset_counts, method=REPLAYS,
            )  # fmt: skip
            graph_extras["time_s_eager"] = eager.to_dict()
    result = run.finish(scenario, timing, info, peaks, flush)
    if graph_extras:
        result = dataclasses.replace(result, extras={**result.extras, **graph_extras})
    counters, why_not = meter
    if counters is None:
        return dataclasses.replace(result, energy_unavailable=why_not)
    reading = measure_energy(run, counters, request.device, result.tokens, timing.median)
    return dataclasses.replace(result, energy=reading)


def graph_capture(request: ProfileRequest) -> Capture | None:
    """How a row of ``request`` captures CUDA graphs: on CUDA unless ``--eager``; None elsewhere."""
    return capture_graphs if request.device.type == "cuda" and request.cuda_graphs else None


def run_profile(
    request: ProfileRequest,
    info: DeviceInfo,
    peaks: Mapping[str, Peaks],
    on_row: Callable[[RowResult], None] = lambda row: None,
) -> list[RowResult]:
    """Every (scenario, weight format, backend) of ``request``, in order; ``peaks`` by compute dtype
    (``MoESpec.compute_dtype``); ``on_row`` is called after each row."""
    check_request_fits(request, info)
    weights = request.layer_weights()
    layers = []  # each format's request and weights, quantized once for every scenario
    for name in request.weight_formats:
        in_fmt = request.in_format(name)
        layers.append((in_fmt, in_format(weights, in_fmt.spec), request.backends_for(name)))
    flusher = functools.cache(lambda: CacheFlusher(info.llc_bytes, request.device))  # made when first needed
    meter = energy_meter(request.device) if request.measure_energy else (None, "not measured (--no-energy)")
    capture = graph_capture(request)
    results = []
    for scenario in request.scenarios:
        row = Row(request, weights, scenario, scenario.tokens)
        for in_fmt, fmt_weights, backends in layers:
            for name in backends:
                fmt_peaks = peaks[in_fmt.spec.compute_dtype]
                result = profile_row(
                    in_fmt, fmt_weights, row, scenario, name, info, fmt_peaks, flusher, meter, capture
                )
                results.append(result)
                on_row(result)
    return results
