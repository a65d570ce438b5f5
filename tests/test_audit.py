"""The hardware-counter audit: ncu's CSV summed with its units, the command it runs, the child
forward (run here on the CPU, without ncu), and the refusals on a machine without a GPU."""

from __future__ import annotations

import json

import pytest
import torch

from moecap_kernels import audit
from moecap_kernels.metrics import traffic
from moecap_kernels.profile import main as profile_main
from moecap_kernels.routing import route_tokens
from moecap_kernels.weights import random_weights
from tests.helpers import tiny_config, tiny_spec

NCU_CSV = """==PROF== Connected to process 4242 (/usr/bin/python3)
==PROF== Profiling "gate_up_kernel" - 0: 0%....50%....100% - 1 pass
"ID","Process ID","Kernel Name","Context","Stream","dram__bytes_read.sum","dram__bytes_write.sum"
"","","","","","Mbyte","Kbyte"
"0","4242","count_routing_kernel","1","7","0.01","0.5"
"1","4242","gate_up_kernel","1","7","1,234.5","12"
"2","4242","down_kernel","1","7","600","256"
==PROF== Disconnected from process 4242
"""


def test_ncu_csv_is_summed_over_kernels_with_its_units():
    totals = audit.parse_ncu_csv(NCU_CSV)
    assert totals["kernels"] == 3
    assert totals["dram__bytes_read.sum"] == pytest.approx((0.01 + 1234.5 + 600) * 1e6)
    assert totals["dram__bytes_write.sum"] == pytest.approx((0.5 + 12 + 256) * 1e3)


def test_an_empty_table_is_said_plainly():
    with pytest.raises(ValueError, match="no metrics table"):
        audit.parse_ncu_csv("==PROF== No kernels were profiled.\n")


def test_the_ncu_command_profiles_the_audited_range_only():
    command = audit.ncu_command("/opt/ncu", ["python", "-m", "moecap_kernels.audit", "spec.json"])
    assert command[:3] == ["/opt/ncu", "--metrics", "dram__bytes_read.sum,dram__bytes_write.sum"]
    assert command[command.index("--nvtx-include") + 1] == "moecap_audit/"
    assert command[-4:] == ["python", "-m", "moecap_kernels.audit", "spec.json"]


def test_without_ncu_the_row_says_so(monkeypatch):
    monkeypatch.setattr(audit, "ncu_path", lambda: None)
    assert audit.audit_row(tiny_spec(), "loop", 1, 0, "cuda", "router") == {
        "unavailable": "ncu (Nsight Compute) is not on PATH"
    }


def test_the_child_counts_the_forward_it_runs(tmp_path):
    spec = tiny_spec(weight_dtype="float32", act_dtype="float32")
    spec_path, out = tmp_path / "spec.json", tmp_path / "counted.json"
    spec_path.write_text(json.dumps(spec.to_dict()))
    assert audit.child_main([str(spec_path), "loop", "6", "3", "cpu", "router", str(out)]) == 0
    counted = json.loads(out.read_text())
    weights = random_weights(spec, torch.device("cpu"), seed=3)  # the row's inputs, rebuilt independently
    gen = torch.Generator().manual_seed(3 + 6)
    x = torch.randn(6, spec.hidden_size, generator=gen)
    ids, _ = route_tokens(x, weights, spec)
    activated = len(torch.unique(ids))
    assert counted["activated"] == activated
    assert counted["compulsory_bytes"] == traffic(spec, 6, activated * spec.expert_weight_bytes).compulsory


def test_audit_needs_a_gpu(tmp_path, capsys):
    argv = ["--config", str(tiny_config(tmp_path / "m")), "--device", "cpu", "--audit"]
    assert profile_main(argv) == 2
    assert capsys.readouterr().err.strip() == (
        "moecap: error: --audit reads a GPU's DRAM counters with Nsight Compute: it needs a CUDA device"
    )
