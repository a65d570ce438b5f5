"""Read bandwidth of the fused CPU MoE kernel (``moecap::moe_experts_cpu``) at decode batch sizes.

For each model (random bf16 weights) and token count T, every repetition draws a fresh x and a
fresh routing and times, in turn, each after one pass of a streaming read (torch sum over a 1 GiB
buffer, which also evicts the caches): the fused op, the plain torch per-expert loop (the ``loop``
backend), the ``cpu_fused`` backend (the op, or GEMMs on oneDNN-packed weights at large T) and
those packed GEMMs alone (``gemm_experts``; packed in the untimed warm-up). Interleaving them means
drift of a shared machine hits all alike. Reported per T: median op time, GB/s of activated weight
bytes (activated experts × 3·H·F·2 B / time), that as a fraction of the best streaming bandwidth
of the whole run and of the streaming pass just before (median of the per-repetition ratios), the
loop's time, the packed GEMMs' time, and the op's and the backend's speed-ups over the loop.

    python benchmarks/cpu_kernel_bench.py [--models mixtral-8x7b,qwen3-30b-a3b] [--tokens 1,2,4]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from moecap_kernels.backends.cpu_fused import CpuFusedBackend, gemm_experts
from moecap_kernels.backends.loop import LoopBackend
from moecap_kernels.spec import MoESpec, load_preset
from moecap_kernels.weights import MoEWeights, random_weights

GIB = 1 << 30
DEFAULT_MODELS = "mixtral-8x7b,qwen3-30b-a3b"
DEFAULT_TOKENS = "1,2,4,8,16,32,64"


@dataclass(frozen=True)
class Row:
    """One table row: medians over the repetitions of one (model, T)."""

    tokens: int
    op_s: float
    op_gbs: float
    frac_best: float
    frac_paired: float
    loop_s: float
    gemm_s: float
    backend_s: float


def load_op() -> Callable[..., torch.Tensor]:
    """torch.ops.moecap.moe_experts_cpu, building the extension when it is not loaded yet."""
    if not hasattr(torch.ops.moecap, "moe_experts_cpu"):
        from moecap_kernels import _ext

        if not _ext.has_op("moe_experts_cpu"):
            raise SystemExit(f"moe_experts_cpu is not available: {_ext.extension_status()}")
    return torch.ops.moecap.moe_experts_cpu


class StreamProbe:
    """Streaming read bandwidth: one torch sum over a 1 GiB fp32 buffer per call."""

    def __init__(self) -> None:
        # random values: pages of one constant value can be merged by the host and read from cache
        self._buffer = torch.rand(GIB // 4, dtype=torch.float32)
        self.samples: list[float] = []

    def __call__(self) -> float:
        start = time.perf_counter()
        self._buffer.sum()
        gbs = GIB / (time.perf_counter() - start) / 1e9
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


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(spec: MoESpec, weights: MoEWeights, tokens: int, reps: int, probe: StreamProbe) -> Row:
    """Interleaved stream / op / loop repetitions for one T (one untimed warm-up of each)."""
    op, loop, backend = load_op(), LoopBackend(), CpuFusedBackend()
    code = {"silu": 0, "gelu": 1}[spec.activation]
    gen = torch.Generator().manual_seed(tokens)

    def run_op(x: torch.Tensor, ids: torch.Tensor, wts: torch.Tensor) -> object:
        return op(x, weights.w_in, weights.w_out, ids, wts, spec.gated, code)

    def run_loop(x: torch.Tensor, ids: torch.Tensor, wts: torch.Tensor) -> object:
        return loop.forward(x, weights, spec, ids, wts)

    def run_backend(x: torch.Tensor, ids: torch.Tensor, wts: torch.Tensor) -> object:
        return backend.forward(x, weights, spec, ids, wts)

    def run_gemm(x: torch.Tensor, ids: torch.Tensor, wts: torch.Tensor) -> object:
        return gemm_experts(x, weights, spec, ids, wts)

    warm = draw_inputs(spec, tokens, gen)
    for run in (run_op, run_loop, run_backend, run_gemm):
        run(*warm)
    op_s, op_gbs, paired, loop_s, backend_s, gemm_s = [], [], [], [], [], []
    for _ in range(reps):
        inputs = draw_inputs(spec, tokens, gen)
        stream_gbs = probe()
        seconds = timed(lambda inputs=inputs: run_op(*inputs))
        gbs = activated_bytes(spec, inputs[1]) / seconds / 1e9
        op_s.append(seconds)
        op_gbs.append(gbs)
        paired.append(gbs / stream_gbs)
        probe()  # each run starts with a cold cache
        loop_s.append(timed(lambda inputs=inputs: run_loop(*inputs)))
        probe()
        backend_s.append(timed(lambda inputs=inputs: run_backend(*inputs)))
        probe()
        gemm_s.append(timed(lambda inputs=inputs: run_gemm(*inputs)))
    med_gbs = statistics.median(op_gbs)
    return Row(
        tokens,
        statistics.median(op_s),
        med_gbs,
        med_gbs / probe.best,
        statistics.median(paired),
        statistics.median(loop_s),
        statistics.median(gemm_s),
        statistics.median(backend_s),
    )


def print_table(name: str, rows: list[Row], best_stream: float) -> None:
    print(f"\n{name} (bf16), best streaming read {best_stream:.1f} GB/s (torch sum, 1 GiB)")
    print(
        f"{'T':>4} {'op ms':>9} {'GB/s':>7} {'/best':>7} {'/paired':>8} {'loop ms':>9} {'packed ms':>10}"
        f" {'op x':>7} {'backend ms':>11} {'backend x':>10}"
    )
    for r in rows:
        print(
            f"{r.tokens:>4} {r.op_s * 1e3:>9.2f} {r.op_gbs:>7.1f} {r.frac_best:>7.1%} {r.frac_paired:>8.1%} "
            f"{r.loop_s * 1e3:>9.2f} {r.gemm_s * 1e3:>10.2f} {r.loop_s / r.op_s:>6.2f}x "
            f"{r.backend_s * 1e3:>11.2f} {r.loop_s / r.backend_s:>9.2f}x"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=DEFAULT_MODELS, help="comma-separated preset names")
    parser.add_argument("--tokens", default=DEFAULT_TOKENS, help="comma-separated token counts T")
    parser.add_argument("--reps", type=int, default=9, help="timed repetitions per T")
    args = parser.parse_args(argv)
    load_op()
    probe = StreamProbe()
    for _ in range(3):
        probe()
    isa, threaded = torch.ops.moecap.moe_experts_cpu_info()
    openmp = "on" if threaded else "OFF (single-threaded build)"
    print(f"torch threads: {torch.get_num_threads()}; op: isa level {isa}, OpenMP {openmp}")
    for name in args.models.split(","):
        spec = load_preset(name).with_dtype("bfloat16")
        weights = random_weights(spec)
        rows = [measure(spec, weights, int(t), args.reps, probe) for t in args.tokens.split(",")]
        print_table(name, rows, probe.best)
        del weights
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
