r"""Read bandwidth of the fused CPU MoE kernel (``moecap::moe_experts_cpu``) at decode batch sizes.

For each model (random bf16 weights) and token count T, inputs (x and a random routing) are drawn
afresh for every repetition, and each repetition times, in an order shuffled per repetition
(``moecap_kernels.timing.time_interleaved``), each after one pass of a streaming read
(``moecap::stream_read``, one of calibration's readers, over a 1 GiB buffer; it also evicts the
caches): the fused op (``cpu_fused.fused_experts``), the plain torch per-expert loop (the ``loop``
backend), the ``cpu_fused`` backend (the op, or GEMMs on oneDNN-packed weights at large T) and those
packed GEMMs alone (``gemm_experts``; packed in the untimed warm-up). Interleaving them means drift
of a shared machine hits all alike. Reported per T: median op time, GB/s of activated weight bytes
(activated experts × 3·H·F·2 B / time), that as a fraction of the best streaming bandwidth of the
whole run (all models; the tables are printed once everything is measured) and of the streaming
pass just before (median of the per-repetition ratios), the loop's time, the packed GEMMs' time, and
the op's and the backend's speed-ups over the loop.

    python benchmarks/cpu_kernel_bench.py [--models mixtral-8x7b,qwen3-30b-a3b] [--tokens 1,2,4]

The crossovers cited in moecap_kernels/backends/cpu_fused.py (op ms against packed ms) come from:

    python benchmarks/cpu_kernel_bench.py --models mixtral-8x7b --tokens 1,2,4
    python benchmarks/cpu_kernel_bench.py \
        --models qwen3-30b-a3b,olmoe-1b-7b,deepseek-v2-lite --tokens 32,64,128
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass

import torch

from moecap_kernels._ext import has_op
from moecap_kernels.backends import cpu_fused
from moecap_kernels.backends.cpu_fused import CpuFusedBackend, gemm_experts
from moecap_kernels.backends.loop import LoopBackend
from moecap_kernels.spec import MoESpec, load_preset
from moecap_kernels.timing import time_interleaved
from moecap_kernels.weights import MoEWeights, random_weights

GIB = 1 << 30
DEFAULT_MODELS = "mixtral-8x7b,qwen3-30b-a3b"
DEFAULT_TOKENS = "1,2,4,8,16,32,64"
CPU = torch.device("cpu")


@dataclass(frozen=True)
class Row:
    """One table row: medians over the repetitions of one (model, T). ``/best`` is computed when
    printing, against the best streaming read of the whole run."""

    tokens: int
    op_s: float
    op_gbs: float
    frac_paired: float
    loop_s: float
    gemm_s: float
    backend_s: float


def unavailable_reason() -> str | None:
    """None when the fused op and the streaming read can run, else one line saying why not."""
    reason = cpu_fused.op_unavailable_reason()
    if reason is None and not has_op("stream_read", "cpu"):
        reason = "the compiled op moecap::stream_read is not available"
    return reason


class StreamProbe:
    """Streaming read bandwidth: one ``moecap::stream_read`` over an ``nbytes`` buffer per call."""

    def __init__(self, nbytes: int = GIB) -> None:
        # random values: pages of one constant value can be merged by the host and read from cache
        self._buffer = torch.rand(nbytes // 4, dtype=torch.float32)
        self._nbytes = nbytes
        self.samples: list[float] = []

    def __call__(self) -> float:
        start = time.perf_counter()
        torch.ops.moecap.stream_read(self._buffer)
        gbs = self._nbytes / (time.perf_counter() - start) / 1e9
        self.samples.append(gbs)
        return gbs

    @property
    def best(self) -> float:
        return max(self.samples)


def activated_bytes(spec: MoESpec, topk_ids: torch.Tensor) -> int:
    """Weight bytes the layer must read: distinct routed experts × one expert's weights."""
    return int(torch.unique(topk_ids).numel()) * spec.expert_weight_bytes


def draw_inputs(spec: MoESpec, tokens: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Fresh activations and a random top-k routing with renormalised softmax-like weights."""
    x = torch.randn(tokens, spec.hidden_size, generator=gen).to(torch.bfloat16)
    scores = torch.rand(tokens, spec.num_experts, generator=gen)
    top = scores.topk(spec.top_k, dim=1)
    return x, top.indices, top.values / top.values.sum(dim=1, keepdim=True)


def measure(spec: MoESpec, weights: MoEWeights, tokens: int, reps: int, probe: StreamProbe) -> Row:
    """Interleaved op / loop / backend / packed-GEMM repetitions for one T, a streaming pass before
    each (one untimed warm-up of each, on the first repetition's inputs)."""
    loop, backend = LoopBackend(), CpuFusedBackend()
    gen = torch.Generator().manual_seed(tokens)
    inputs = [draw_inputs(spec, tokens, gen) for _ in range(reps)]
    stream_before_op = [0.0] * reps  # the streaming pass just before each timed op run

    def run_op(i: int) -> object:
        stream_before_op[i] = probe.samples[-1] if probe.samples else 0.0  # a list store: negligible
        x, ids, wts = inputs[i]
        return cpu_fused.fused_experts(x, weights.w_in, weights.w_out, ids, wts, spec)

    def run_loop(i: int) -> object:
        return loop.forward(inputs[i][0], weights, spec, *inputs[i][1:])

    def run_backend(i: int) -> object:
        return backend.forward(inputs[i][0], weights, spec, *inputs[i][1:])

    def run_gemm(i: int) -> object:
        return gemm_experts(inputs[i][0], weights, spec, *inputs[i][1:])

    op, loop_t, backend_t, gemm_t = time_interleaved(
        [run_op, run_loop, run_backend, run_gemm], CPU, warmup=1, reps=reps, between=probe
    )
    op_gbs = [activated_bytes(spec, inputs[i][1]) / s / 1e9 for i, s in enumerate(op.samples_s)]
    return Row(
        tokens,
        op.median,
        statistics.median(op_gbs),
        statistics.median(g / stream for g, stream in zip(op_gbs, stream_before_op, strict=True)),
        loop_t.median,
        gemm_t.median,
        backend_t.median,
    )


def print_table(name: str, rows: list[Row], best_stream: float) -> None:
    print(f"\n{name} (bf16), best streaming read of the run {best_stream:.1f} GB/s (stream_read, 1 GiB)")
    print(
        f"{'T':>4} {'op ms':>9} {'GB/s':>7} {'/best':>7} {'/paired':>8} {'loop ms':>9} {'packed ms':>10}"
        f" {'op x':>7} {'backend ms':>11} {'backend x':>10}"
    )
    for r in rows:
        print(
            f"{r.tokens:>4} {r.op_s * 1e3:>9.2f} {r.op_gbs:>7.1f} {r.op_gbs / best_stream:>7.1%} "
            f"{r.frac_paired:>8.1%} {r.loop_s * 1e3:>9.2f} {r.gemm_s * 1e3:>10.2f} "
            f"{r.loop_s / r.op_s:>6.2f}x {r.backend_s * 1e3:>11.2f} {r.loop_s / r.backend_s:>9.2f}x"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=DEFAULT_MODELS, help="comma-separated preset names")
    parser.add_argument("--tokens", default=DEFAULT_TOKENS, help="comma-separated token counts T")
    parser.add_argument("--reps", type=int, default=9, help="timed repetitions per T")
    args = parser.parse_args(argv)
    reason = unavailable_reason()
    if reason is not None:
        print(f"cpu_kernel_bench: {reason}", file=sys.stderr)
        return 1
    probe = StreamProbe()
    for _ in range(3):
        probe()
    isa, threaded = torch.ops.moecap.moe_experts_cpu_info()
    openmp = "on" if threaded else "OFF (single-threaded build)"
    print(f"torch threads: {torch.get_num_threads()}; op: isa level {isa}, OpenMP {openmp}")
    token_counts = [int(t) for t in args.tokens.split(",")]
    tables: list[tuple[str, list[Row]]] = []
    for name in args.models.split(","):
        spec = load_preset(name).with_dtype("bfloat16")
        weights = random_weights(spec)
        tables.append((name, [measure(spec, weights, t, args.reps, probe) for t in token_counts]))
        print(f"measured {name}", file=sys.stderr)
        del weights
    for name, rows in tables:  # after every model: /best is against the best streaming read of the run
        print_table(name, rows, probe.best)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
