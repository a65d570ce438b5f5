"""Experts in a slow tier: a raw file on disk, one expert after another, read through the page cache.

Each expert's record holds its tensors' bytes in a fixed order (``w_in``, ``w_out``, then the biases
where the layer has them), exactly ``MoESpec.expert_weight_bytes`` long. A fetch reads one record
into the fast tier's tensors with ``os.preadv`` (no copy through Python). Unless the user keeps it,
the file's page cache is dropped (``posix_fadvise(DONTNEED)``) before each step's fetches, so that
reads really reach the disk; the tier's read ceiling is measured the same way, on the same file.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import torch

from moecap_kernels.weights import MoEWeights


def expert_tensors(weights: MoEWeights, e: int) -> list[torch.Tensor]:
    """Expert e's tensors, in record order."""
    parts = [weights.w_in[e], weights.w_out[e]]
    parts += [b[e] for b in (weights.w_in_bias, weights.w_out_bias) if b is not None]
    return parts


def _bytes_view(t: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor's storage."""
    return memoryview(t.view(torch.uint8).numpy() if t.dtype != torch.uint8 else t.numpy()).cast("B")


class DiskTier:
    """A file of expert records; ``fetch`` reads one into given tensors (bytes read returned)."""

    def __init__(self, path: Path, weights: MoEWeights, drop_cache: bool = True) -> None:
        self.path, self.drop_cache = path, drop_cache
        self.record_bytes = sum(t.numel() * t.element_size() for t in expert_tensors(weights, 0))
        self.num_experts = weights.w_in.shape[0]
        with path.open("wb") as handle:
            for e in range(self.num_experts):
                for t in expert_tensors(weights, e):
                    handle.write(_bytes_view(t.contiguous()))
            handle.flush()
            os.fsync(handle.fileno())
        self.fd = os.open(path, os.O_RDONLY)

    def close(self) -> None:
        os.close(self.fd)
        self.path.unlink(missing_ok=True)

    def drop(self) -> None:
        """Drop the file's pages from the page cache (when asked to), so the next reads reach the disk."""
        if self.drop_cache and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def fetch(self, e: int, into: list[torch.Tensor]) -> int:
        """Read expert e's record into ``into`` (contiguous CPU tensors in record order)."""
        views = [_bytes_view(t) for t in into]
        done = os.preadv(self.fd, views, e * self.record_bytes)
        if done != self.record_bytes:
            raise OSError(f"{self.path}: read {done} of {self.record_bytes} bytes of expert {e}")
        return done

    def read_ceiling(self, reps: int = 3) -> list[float]:
        """Bytes/s of reading the whole file record by record from a dropped cache, ``reps`` times."""
        buffer = np.empty(self.record_bytes, dtype=np.uint8)
        rates = []
        for _ in range(reps):
            self.drop()
            start = time.perf_counter()
            for e in range(self.num_experts):
                os.preadv(self.fd, [buffer], e * self.record_bytes)
            rates.append(self.num_experts * self.record_bytes / (time.perf_counter() - start))
        return rates
