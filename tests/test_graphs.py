"""The CUDA-graph timing path, exercised on the CPU with a stand-in capture (the real
``torch.cuda.CUDAGraph`` path runs in tests/test_gpu.py): graph-safe backends are timed by their
replays with the eager time beside it, the others keep their eager time and say why, and a capture
that fails falls back in one line; counts stay exact either way."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from moecap_kernels import hardware
from moecap_kernels.backends import get_backend
from moecap_kernels.graphs import REPLAYS, try_capture
from moecap_kernels.report import denominators_note, record, results_table
from moecap_kernels.routing import parse_routing
from moecap_kernels.runner import INPUT_COPIES, ProfileRequest, Row, Scenario, profile_row
from moecap_kernels.timing import EAGER_HOST
from moecap_kernels.weights import random_weights
from tests.hardware_fakes import fake_info
from tests.helpers import tiny_spec

CPU = torch.device("cpu")
PEAKS = hardware.Peaks(40e9, 200e9, "float32", "user", "user")


def _row_inputs(reps: int = 4):
    spec = tiny_spec(weight_dtype="float32", act_dtype="float32")
    request = ProfileRequest(spec, (Scenario("decode", 5),), ("loop",), parse_routing("router"), CPU,
                             warmup=1, reps=reps, measure_energy=False)  # fmt: skip
    weights = random_weights(spec, CPU, seed=3)
    row = Row(request, weights, request.scenarios[0], 5)
    info = dataclasses.replace(fake_info("cpu", "test CPU"), llc_bytes=1 << 30)  # no flush needed
    return request, weights, row, info


class StandInCapture:
    """Captures by remembering the run; a replay calls it (what a graph replay computes)."""

    def __init__(self) -> None:
        self.captured, self.replays = [], 0

    def __call__(self, run, copies, device):
        self.captured.append((copies, device))

        def replay(i: int) -> None:
            self.replays += 1
            run(i)

        return replay


def _profile(capture, monkeypatch, graph_safe: bool):
    monkeypatch.setattr(type(get_backend("loop")), "graph_safe", graph_safe)
    request, weights, row, info = _row_inputs()
    return profile_row(request, weights, row, request.scenarios[0], "loop", info, PEAKS, capture=capture)


def test_graph_safe_backends_are_timed_by_replays_with_eager_beside(monkeypatch):
    capture = StandInCapture()
    result = _profile(capture, monkeypatch, graph_safe=True)
    assert capture.captured == [(INPUT_COPIES, CPU)]
    assert capture.replays == 1 + 4  # warm-up (min(warmup, 3) = 1) and the 4 timed replays
    assert result.time.method == REPLAYS and len(result.time.samples_s) == 4
    eager = result.extras["time_s_eager"]
    assert eager["reps"] == 4 and eager["method"] == EAGER_HOST
    entry = record(result)
    assert entry["time_s"]["method"] == REPLAYS and entry["time_s_eager"] == eager
    _, _, row, _ = _row_inputs()
    counts = torch.bincount(row.ids.reshape(-1), minlength=8).tolist()
    assert list(result.counts.tokens_per_expert) == counts  # per forward, over the replays alone
    assert result.rel_error is not None and result.rel_error < 1e-5
    table = results_table([result])
    assert [c.header for c in table.columns][-1] == "eager p50"
    assert "time p50 is the kernels' time for the 1 graphed rows" in denominators_note([result])


def test_other_backends_keep_their_eager_time_and_say_why(monkeypatch):
    capture = StandInCapture()
    result = _profile(capture, monkeypatch, graph_safe=False)
    assert capture.captured == [] and result.time.method == EAGER_HOST
    assert result.extras["cuda_graph"] == "not captured: the backend waits for the host inside a forward"
    assert "time_s_eager" not in result.extras


def test_a_failed_capture_falls_back_in_one_line(monkeypatch):
    def failing(run, copies, device):
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing\nmore detail")

    result = _profile(failing, monkeypatch, graph_safe=True)
    assert result.time.method == EAGER_HOST
    assert result.extras["cuda_graph"] == (
        "not captured as a CUDA graph: CUDA error: operation not permitted when stream is capturing"
    )


def test_try_capture_passes_the_replay_through():
    replay, why = try_capture(lambda run, copies, device: run, print, 2, CPU)
    assert replay is print and why == ""


def test_without_a_capture_nothing_changes():
    request, weights, row, info = _row_inputs()
    result = profile_row(request, weights, row, request.scenarios[0], "loop", info, PEAKS)
    assert result.time.method == EAGER_HOST
    assert "cuda_graph" not in result.extras and "time_s_eager" not in result.extras


@pytest.mark.parametrize("name", ["loop", "grouped", "cpu_fused", "dequant"])
def test_only_backends_without_host_syncs_are_graph_safe(name):
    assert get_backend(name).graph_safe is False
    assert get_backend("triton").graph_safe is True


def test_eager_turns_the_graphs_off():
    from moecap_kernels.graphs import capture_graphs
    from moecap_kernels.profile import parse_args
    from moecap_kernels.runner import graph_capture

    assert parse_args(["--eager"]).eager is True and parse_args([]).eager is False
    request, _, _, _ = _row_inputs()
    cuda = dataclasses.replace(request, device=torch.device("cuda"))
    assert graph_capture(cuda) is capture_graphs
    assert graph_capture(dataclasses.replace(cuda, cuda_graphs=False)) is None
    assert graph_capture(request) is None  # a CPU has no graphs to capture
