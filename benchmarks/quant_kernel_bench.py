r"""Decode speed of ``cpu_fused`` on quantized experts (``moecap::moe_experts_cpu_q``) against bf16
weights and against a streaming read of the same bytes.

One Mixtral-8x7B layer (H 4096, F 14336, top-2; ``--experts`` of its 8 experts, to fit memory: T = 1
reads 2 of them either way) with random bf16 weights, quantized once into each format. Every
repetition draws a fresh bf16 x [1, H] and routing, then times, in an order shuffled per repetition
(``moecap_kernels.timing.time_interleaved``): the op for each format (bf16 ``none`` through the dense
op), and for each format a streaming read (``moecap::stream_read``) of exactly as many bytes as that
format's two activated experts hold (codes, scales, zero points). Reported per format, medians over
the repetitions of per-repetition ratios (so drift of the machine's bandwidth cancels): the op's
time, the bf16 op's time over it (speed-up), and the paired streaming read's time over it (the
fraction of the streaming read of its own bytes that the op reaches).

    python benchmarks/quant_kernel_bench.py [--reps 15] [--experts 4] [--formats int8,int4-g128]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys

import torch

from moecap_kernels.backends import cpu_fused
from moecap_kernels.quant.quantize import QuantizedMatrix, quantize_matrix
from moecap_kernels.spec import load_preset
from moecap_kernels.timing import time_interleaved
from moecap_kernels.weights import random_weights

FORMATS = "none,int8,w8a8,int4-g128,int4-g128-zp,fp8-channel,fp8-block,mxfp4"
CPU = torch.device("cpu")


def expert_bytes(matrix: QuantizedMatrix, e: int) -> int:
    parts = (matrix.codes[e], matrix.scales[e], None if matrix.zeros is None else matrix.zeros[e])
    return sum(t.numel() * t.element_size() for t in parts if t is not None)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--experts", type=int, default=4, help="experts held in memory (T = 1 reads 2)")
    parser.add_argument("--formats", default=FORMATS)
    args = parser.parse_args()
    reason = cpu_fused.op_unavailable_reason(cpu_fused.QUANT_OP_NAME)
    if reason is not None:
        print(f"quant_kernel_bench: {reason}", file=sys.stderr)
        return 1
    base = dataclasses.replace(load_preset("mixtral-8x7b"), num_experts=args.experts)
    spec = base.with_dtype("bfloat16")
    weights = random_weights(spec, seed=0)
    names = args.formats.split(",")
    quantized: dict[str, tuple[QuantizedMatrix, QuantizedMatrix] | None] = {}
    for name in names:
        if name == "none":
            quantized[name] = None
            continue
        fmt = spec.with_format(name).fmt
        if name == "w8a8" and "int8" in quantized:  # the same codes and scales as int8
            a, b = quantized["int8"]
            quantized[name] = (dataclasses.replace(a, fmt=fmt), dataclasses.replace(b, fmt=fmt))
            continue
        f, h = spec.intermediate_size, spec.hidden_size
        quantized[name] = (quantize_matrix(weights.w_in, fmt, f), quantize_matrix(weights.w_out, fmt, h))
    dense_bytes = 2 * (weights.w_in[0].nbytes + weights.w_out[0].nbytes)
    nbytes = {
        n: dense_bytes if q is None else 2 * (expert_bytes(q[0], 0) + expert_bytes(q[1], 0))
        for n, q in quantized.items()
    }
    buffer = torch.randint(-(2**62), 2**62, (max(nbytes.values()) // 8 + 1,), dtype=torch.int64)
    gen = torch.Generator().manual_seed(1)
    inputs = []
    for _ in range(args.reps + 1):
        x = torch.randn(1, spec.hidden_size, generator=gen).to(torch.bfloat16)
        ids = torch.randperm(spec.num_experts, generator=gen)[:2][None]
        inputs.append((x, ids, torch.tensor([[0.6, 0.4]])))

    def op_run(name: str):
        q = quantized[name]

        def run(i: int) -> object:
            x, ids, wts = inputs[i]
            if q is None:
                return cpu_fused.fused_experts(x, weights.w_in, weights.w_out, ids, wts, spec)
            return cpu_fused.quantized_experts(x, q[0], q[1], ids, wts, spec)

        return run

    def stream_run(name: str):
        view = buffer[: nbytes[name] // 8]
        return lambda i: torch.ops.moecap.stream_read(view)

    runs = [op_run(n) for n in names] + [stream_run(n) for n in names]
    stats = time_interleaved(runs, CPU, warmup=1, reps=args.reps)
    ops, streams = stats[: len(names)], stats[len(names) :]
    dense = ops[names.index("none")].samples_s if "none" in names else None
    print(f"Mixtral-8x7B layer, T=1, bf16 activations, {torch.get_num_threads()} threads, {args.reps} reps")
    print("| format | MB read | op ms | GB/s | vs bf16 | of stream read |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, op, stream in zip(names, ops, streams, strict=True):
        pairs = zip(dense or op.samples_s, op.samples_s, strict=True)
        speedup = statistics.median(d / s for d, s in pairs) if dense else float("nan")
        frac = statistics.median(r / s for r, s in zip(stream.samples_s, op.samples_s, strict=True))
        gbs = nbytes[name] / op.median / 1e9
        print(
            f"| {name} | {nbytes[name] / 1e6:.0f} | {op.median * 1e3:.2f} | {gbs:.1f} | "
            f"{speedup:.2f}x | {frac:.2f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
