"""Sparsity-aware utilization: bytes and FLOPs of one forward, S-MBU, S-MFU, dense MBU/MFU, roofline.

Inputs are exact integers (the spec, the token count, the per-forward routing counts) plus a
measured time and the peaks used as denominators. Nothing here knows how the layer was run.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from moecap_kernels.spec import MoESpec


@dataclass(frozen=True)
class Traffic:
    """Compulsory bytes of one forward (and the dense figure, every expert read).

    ``router_weights`` includes the router's bias; ``selection_bias`` is the float32 correction bias
    read to choose experts; ``shared_gate_weights`` the shared experts' gate vectors.
    """

    expert_weights: int
    shared_weights: int
    router_weights: int
    activations: int
    dense: int
    selection_bias: int = 0
    shared_gate_weights: int = 0

    @property
    def compulsory(self) -> int:
        return (
            self.expert_weights
            + self.shared_weights
            + self.router_weights
            + self.activations
            + self.selection_bias
            + self.shared_gate_weights
        )

    def to_dict(self) -> dict[str, int]:
        return {**asdict(self), "compulsory": self.compulsory}


@dataclass(frozen=True)
class Work:
    """Useful FLOPs of one forward (multiply-add = 2), and the dense figure (every expert on every token).

    GEMMs only, as FLOP counters count them: the shared experts' gates are a GEMM (2·T·H·S) and
    counted; biases, activations, scores and weighting are elementwise and not.
    """

    experts: int
    shared: int
    router: int
    dense: int
    shared_gate: int = 0

    @property
    def useful(self) -> int:
        return self.experts + self.shared + self.router + self.shared_gate

    def to_dict(self) -> dict[str, int]:
        return {**asdict(self), "useful": self.useful}


def traffic(spec: MoESpec, tokens: int, expert_weight_bytes: int) -> Traffic:
    """Bytes of one forward; ``expert_weight_bytes`` = activated_experts · an expert's bytes in the
    weight format (``MoESpec.expert_weight_bytes``, from the counters)."""
    b_w = spec.weight_bytes_per_param
    shared = spec.num_shared_experts * spec.shared_expert_weight_bytes
    router = spec.router_params * b_w
    activations = 2 * tokens * spec.hidden_size * spec.act_bytes_per_element
    gates = spec.shared_gate_params * b_w
    always = shared + router + activations + spec.selection_bias_bytes + gates
    dense = spec.num_experts * spec.expert_weight_bytes + always
    return Traffic(expert_weight_bytes, shared, router, activations, dense, spec.selection_bias_bytes, gates)


def work(spec: MoESpec, tokens: int, expert_flops: int) -> Work:
    """FLOPs of one forward; ``expert_flops`` = Σ_e n_e · 2·P_e (from the counters)."""
    shared = tokens * 2 * spec.num_shared_experts * spec.params_per_shared_expert
    router = 2 * tokens * spec.num_experts * spec.hidden_size
    gate = 2 * tokens * spec.shared_gate_params
    dense_experts = tokens * spec.num_experts * 2 * spec.params_per_expert
    return Work(expert_flops, shared, router, dense_experts + shared + router + gate, gate)


@dataclass(frozen=True)
class Utilization:
    s_mbu: float
    s_mfu: float
    mbu_dense: float
    mfu_dense: float
    arithmetic_intensity: float  # useful FLOPs per compulsory byte
    ridge_point: float  # peak FLOP/s per peak byte/s
    bound: str  # "memory" or "compute"
    roofline_time_s: float  # max(compulsory / peak bandwidth, useful / peak flops)


def utilization(
    bytes_: Traffic, flops: Work, seconds: float, peak_bandwidth: float, peak_flops: float
) -> Utilization:
    """Ratios of one forward's figures to ``seconds`` and the peaks (bytes/s, FLOP/s)."""
    intensity = flops.useful / bytes_.compulsory
    ridge = peak_flops / peak_bandwidth
    return Utilization(
        s_mbu=bytes_.compulsory / seconds / peak_bandwidth,
        s_mfu=flops.useful / seconds / peak_flops,
        mbu_dense=bytes_.dense / seconds / peak_bandwidth,
        mfu_dense=flops.dense / seconds / peak_flops,
        arithmetic_intensity=intensity,
        ridge_point=ridge,
        bound="memory" if intensity < ridge else "compute",
        roofline_time_s=max(bytes_.compulsory / peak_bandwidth, flops.useful / peak_flops),
    )


def load_imbalance(tokens_per_expert: tuple[int, ...] | list[int]) -> float:
    """max / mean routed pairs per expert (mean over all E experts); 1.0 is perfectly balanced."""
    total = sum(tokens_per_expert)
    return max(tokens_per_expert) * len(tokens_per_expert) / total if total else 0.0
