"""CUDA graphs of a timed forward: kernel time, not what the host pays to launch them.

A decode forward issues 15–25 launches; on a fast GPU the host needs longer to issue them than
the kernels need to run. Captured once per input buffer (the timed loop rotates its inputs), a
forward — router, experts, combine and the counting — replays as one graph launch, so events
around a replay time the kernels. The eager loop is still timed beside it (``time_s_eager``).

Only backends that never wait for the host inside a forward (``Backend.graph_safe``) are captured;
a capture that fails anyway is reported, and the row keeps its eager time.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

REPLAYS = "cuda-graph replays"  # TimingStats.method of a timed row's replays
Replay = Callable[[int], None]
Capture = Callable[[Callable[[int], object], int, torch.device], Replay]


def capture_graphs(run: Callable[[int], object], copies: int, device: torch.device) -> Replay:
    """``run(i)`` for i < ``copies`` captured as one CUDA graph each (after warm-up: kernels compiled,
    workspaces allocated); the result replays graph ``i % copies`` on the current stream."""
    graphs = []
    with torch.cuda.device(device):
        torch.cuda.synchronize(device)
        for i in range(copies):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):  # a side stream of its own, private memory pool
                run(i)
            graphs.append(graph)
        torch.cuda.synchronize(device)

    def replay(i: int) -> None:
        graphs[i % copies].replay()

    return replay


def try_capture(
    capture: Capture, run: Callable[[int], object], copies: int, device: torch.device
) -> tuple[Replay | None, str]:
    """(the replay, "") or (None, why the forward could not be captured: one line)."""
    try:
        return capture(run, copies, device), ""
    except (RuntimeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return None, f"not captured as a CUDA graph: {first}"
