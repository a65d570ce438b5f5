"""NVTX ranges: nothing on a CPU; on CUDA the nvtx package's moecap domain with the phase as its
category when installed, torch's NVTX otherwise (both through stand-ins here)."""

from __future__ import annotations

import torch

from moecap_kernels import nvtx


class Recorder:
    def __init__(self) -> None:
        self.calls = []

    def push_range(self, **kwargs):
        self.calls.append(("push", kwargs))

    def pop_range(self, **kwargs):
        self.calls.append(("pop", kwargs))


def test_a_cpu_range_does_nothing(monkeypatch):
    monkeypatch.setattr(nvtx, "nvtx_package", lambda: (_ for _ in ()).throw(AssertionError("called")))
    with nvtx.nvtx_range("experts", torch.device("cpu")):
        pass


def test_the_nvtx_package_gets_the_domain_and_category(monkeypatch):
    fake = Recorder()
    monkeypatch.setattr(nvtx, "nvtx_package", lambda: fake)
    with nvtx.nvtx_range("experts", torch.device("cuda")):
        fake.calls.append(("inside", {}))
    with nvtx.nvtx_range("moecap_audit", torch.device("cuda")):
        pass
    assert fake.calls[:3] == [
        ("push", {"message": "experts", "domain": "moecap", "category": "experts"}),
        ("inside", {}),
        ("pop", {"domain": "moecap"}),
    ]
    assert fake.calls[3] == ("push", {"message": "moecap_audit", "domain": "moecap", "category": None})


def test_without_the_package_torch_nvtx_is_used(monkeypatch):
    calls = []
    monkeypatch.setattr(nvtx, "nvtx_package", lambda: None)
    monkeypatch.setattr(torch.cuda.nvtx, "range_push", lambda name: calls.append(("push", name)))
    monkeypatch.setattr(torch.cuda.nvtx, "range_pop", lambda: calls.append(("pop", None)))
    with nvtx.nvtx_range("router", torch.device("cuda")):
        pass
    assert calls == [("push", "router"), ("pop", None)]
