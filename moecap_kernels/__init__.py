"""moecap_kernels: a kernel-level profiler for Mixture-of-Experts layers.

It runs one MoE layer through a chosen backend, counts on the device exactly which experts
each routed token activated, times the layer, and reports sparsity-aware bandwidth and FLOPs
utilization (S-MBU, S-MFU) against the hardware's peaks.
"""

__version__ = "0.1.0"
