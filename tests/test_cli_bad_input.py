"""Every kind of bad input through the CLI as a user runs it (a subprocess): exit code 2, exactly one
line on stderr, never a traceback; and Ctrl-C at any moment: exit code 130 and one line.

The cases run concurrently (a module fixture), each in its own process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from moecap_kernels._ext import load_extension
from tests.helpers import tiny_config

PEAKS = ["--peak-bandwidth", "50e9", "--peak-flops", "500e9"]
FAST = ["--warmup", "1", "--reps", "3", *PEAKS]


def _write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return path


def _npy(path: Path, array: np.ndarray) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, array)
    return f"trace:{path}"


def _npy_header_only(path: Path, shape: tuple[int, ...], rows_written: int) -> str:
    """An .npy file whose header claims ``shape`` but which holds only ``rows_written`` rows."""
    with path.open("wb") as handle:
        np.lib.format.write_array_header_1_0(handle, {"descr": "<i8", "fortran_order": False, "shape": shape})
        handle.write(np.zeros((rows_written, shape[1]), dtype=np.int64).tobytes())
    return f"trace:{path}"


def _config(p: Path, name: str, **fields: object) -> str:
    return str(tiny_config(p / name, **fields))


def _fp8_checkpoint(p: Path) -> list[str]:
    """A Mixtral-layout checkpoint whose experts are float8_e4m3fn tensors (as DeepSeek-V3 stores
    them, their scales elsewhere): read as values they would be wrong, so they must be refused."""
    from safetensors.torch import save_file

    hidden, inter, experts = 64, 48, 8
    folder = tiny_config(p / "fp8", hidden=hidden, inter=inter, experts=experts).parent
    m = "model.layers.0.block_sparse_moe."
    tensors = {m + "gate.weight": torch.randn(experts, hidden)}
    for i in range(experts):
        for name, shape in (("w1", (inter, hidden)), ("w3", (inter, hidden)), ("w2", (hidden, inter))):
            tensors[f"{m}experts.{i}.{name}.weight"] = torch.randn(shape).to(torch.float8_e4m3fn)
    save_file(tensors, str(folder / "model.safetensors"))
    return ["--weights", str(folder)]


# name → (arguments given a scratch folder p, text the one stderr line must hold, extra environment)
BAD = {
    "unknown model": (lambda p: ["--model", "gpt-17"], "unknown model"),
    "empty model": (lambda p: ["--model", ""], "empty string"),
    "empty config": (lambda p: ["--config", ""], "empty string"),
    "model and config": (lambda p: ["--model", "olmoe-1b-7b", "--config", _config(p, "m1")], "not both"),
    "missing config": (lambda p: ["--config", str(p / "nope.json")], "not found"),
    "folder without config": (lambda p: ["--config", str((p / "empty").mkdir() or p / "empty")], "not found"),
    "malformed config": (lambda p: ["--config", str(_write(p / "c.json", "{not json"))], "not valid JSON"),
    "config not an object": (lambda p: ["--config", str(_write(p / "l.json", "[1, 2]"))], "JSON object"),
    "config not utf-8": (lambda p: ["--config", str(_write(p / "b.json", b"\xff\xfe{"))], "cannot read"),
    "config too big": (lambda p: ["--config", str(_write(p / "big.json", " " * (2 << 20)))], "too big"),
    "config too deep": (lambda p: ["--config", str(_write(p / "deep.json", "[" * 50_000))], "not valid JSON"),
    "dense config": (lambda p: ["--config", str(_write(p / "d.json", '{"model_type": "llama"}'))], "dense"),
    "unsupported family": (
        lambda p: ["--config", str(_write(p / "u.json", '{"model_type": "x", "num_experts": 8}'))],
        "unsupported model_type",
    ),
    "missing key": (
        lambda p: ["--config", str(_write(p / "k.json", '{"model_type": "mixtral", "hidden_size": 8}'))],
        "missing key",
    ),
    "hidden_size 10**400": (lambda p: ["--config", _config(p, "h", hidden=10**400)], "hidden_size"),
    "hidden_size a string": (lambda p: ["--config", _config(p, "s", hidden="64")], "hidden_size"),
    "experts 10**9": (lambda p: ["--config", _config(p, "e", experts=10**9)], "num_experts"),
    "k > E": (lambda p: ["--config", _config(p, "ke", experts=2, top_k=3)], "top_k"),
    "zero batch": (lambda p: ["--batch", "0"], "from 1"),
    "bad batch": (lambda p: ["--batch", "1,x"], "integer"),
    "huge batch": (lambda p: ["--batch", str(10**12)], "from 1 to"),
    "prefill too long": (lambda p: ["--phase", "prefill", "--batch", "4096", "--seq-len", "4096"], "tokens"),
    "seq-len on decode": (lambda p: ["--seq-len", "5"], "prefill"),
    "zero seq-len": (lambda p: ["--phase", "prefill", "--seq-len", "0"], "from 1"),
    "bad phase": (lambda p: ["--phase", "train"], "invalid choice"),
    "bad dtype": (lambda p: ["--model", "olmoe-1b-7b", "--dtype", "int8"], "dtype"),
    "empty dtype": (lambda p: ["--dtype", ""], "empty string"),
    "bad device": (lambda p: ["--device", "tpu"], "device"),
    "empty device": (lambda p: ["--device", " "], "empty string"),
    "no gpu": (lambda p: ["--device", "cuda"], "CUDA"),
    "unknown backend": (lambda p: ["--backend", "magic"], "unknown backend"),
    "empty backend": (lambda p: ["--backend", ""], "empty string"),
    "only commas": (lambda p: ["--backend", ",,"], "at least one"),
    "triton without gpu": (lambda p: ["--config", _config(p, "t"), "--backend", "triton"],
                           "TRITON_INTERPRET=1"),
    "bad routing": (lambda p: ["--routing", "zipf:-2"], "zipf"),
    "unknown routing": (lambda p: ["--routing", "gauss:1"], "unknown routing"),
    "empty routing": (lambda p: ["--routing", ""], "empty string"),
    "hot beyond E": (lambda p: ["--config", _config(p, "hot"), "--routing", "hot:99"], "hot:99"),
    "trace missing": (lambda p: ["--config", _config(p, "m2"), "--routing", f"trace:{p / 'no.npy'}"],
                      "no such"),
    "trace garbage": (
        lambda p: ["--config", _config(p, "m3"), "--routing", f"trace:{_write(p / 'g.npy', 'garbage')}"],
        "not a readable",
    ),
    "trace npz": (
        lambda p: ["--config", _config(p, "m4"), "--routing", f"trace:{_npz(p / 'z.npz')}"],
        ".npz",
    ),
    "trace header 10**12 rows": (
        lambda p: ["--config", _config(p, "m5"), "--routing", _npy_header_only(p / "h.npy", (10**12, 2), 3)],
        "beyond the limits",
    ),
    "trace truncated": (
        lambda p: ["--config", _config(p, "m6"), "--routing", _npy_header_only(p / "tr.npy", (100, 2), 10)],
        "truncated",
    ),
    "trace floats": (
        lambda p: ["--config", _config(p, "m7"), "--routing", _npy(p / "f.npy", np.zeros((3, 2)))],
        "integers",
    ),
    "trace 1-D": (
        lambda p: ["--config", _config(p, "m8"), "--routing", _npy(p / "one.npy", np.zeros(3, np.int64))],
        "[T, k]",
    ),
    "trace wrong k": (
        lambda p: ["--config", _config(p, "m9"), "--routing", _npy(p / "k.npy", np.array([[0, 1, 2]]))],
        "top_k=2",
    ),
    "trace id out of range": (
        lambda p: ["--config", _config(p, "ma"), "--routing", _npy(p / "r.npy", np.array([[0, 9]]))],
        "out of range",
    ),
    "trace repeats an expert": (
        lambda p: ["--config", _config(p, "mb"), "--routing", _npy(p / "d.npy", np.array([[4, 4]]))],
        "same expert twice",
    ),
    "trace vs batch": (
        lambda p: ["--config", _config(p, "mc"), "--batch", "4",
                   "--routing", _npy(p / "b.npy", np.array([[0, 1]] * 3))],
        "T=3",
    ),
    "too big for memory": (lambda p: ["--model", "deepseek-v3", "--dtype", "float32", "--device", "cpu"],
                           "GiB"),
    "bad flag": (lambda p: ["--frobnicate"], "unrecognized"),
    "unknown weight format": (lambda p: ["--quant", "int3"], "unknown weight format"),
    "empty weight format": (lambda p: ["--quant", ""], "empty string"),
    "odd int4 group": (lambda p: ["--quant", "int4-g7"], "group size must be even"),
    "group not dividing H": (
        lambda p: ["--model", "gpt-oss-20b", "--quant", "int4-g128"], "groups are not padded"
    ),
    "format no chosen backend runs": (
        lambda p: ["--config", _config(p, "q"), "--backend", "loop", "--quant", "int8"], "cannot run"
    ),
    "not a rate": (lambda p: ["--peak-bandwidth", "fast"], "not a rate"),
    "peak 1e-300": (lambda p: ["--peak-bandwidth", "1e-300"], "implausible"),
    "peak flops 1e30": (lambda p: ["--peak-flops", "1e30"], "implausible"),
    "negative seed": (lambda p: ["--seed", "-1"], "from 0"),
    "seed 2**64": (lambda p: ["--seed", str(2**64)], "from 0 to"),
    "warmup 10**30": (lambda p: ["--warmup", str(10**30)], "from 0 to 1000"),
    "zero reps": (lambda p: ["--reps", "0"], "from 1"),
    "reps 10**6": (lambda p: ["--reps", str(10**6)], "from 1 to"),
    "empty json": (lambda p: ["--json", ""], "empty string"),
    "empty csv": (lambda p: ["--csv", ""], "empty string"),
    "json in a missing folder": (lambda p: ["--json", str(p / "no" / "o.json")], "does not exist"),
    "json is a folder": (lambda p: ["--json", str(p)], "is a folder"),
    "json and csv the same": (lambda p: ["--json", str(p / "o.txt"), "--csv", str(p / "o.txt")], "same file"),
    "good json, bad csv": (lambda p: ["--json", str(p / "ok.json"), "--csv", str(p / "no" / "x.csv")],
                           "x.csv"),
    "cache folder is a file": (lambda p: ["--model", "olmoe-1b-7b"], "is a file"),
    "weights not a folder": (lambda p: ["--weights", str(p / "nowhere")], "not a folder"),
    "weights with a preset": (lambda p: ["--weights", str(p), "--model", "olmoe-1b-7b"], "not --model"),
    "layer without weights": (lambda p: ["--layer", "3"], "give --weights"),
    "fp8 checkpoint tensors": (_fp8_checkpoint, "float8_e4m3fn"),
    "weights without tensors": (lambda p: ["--weights", str(p), "--config", _config(p, "w")],
                                "no .safetensors"),
}  # fmt: skip
if os.geteuid() != 0:  # root writes into a read-only folder all the same
    BAD["read-only output folder"] = (
        lambda p: ["--json", str(_read_only(p / "ro") / "o.json")],
        "cannot write",
    )
ENV = {"cache folder is a file": lambda p: {"MOECAP_CACHE_DIR": str(_write(p / "afile", "x"))}}


def _npz(path: Path) -> Path:
    np.savez(path, ids=np.zeros((2, 2), np.int64))
    return path


def _read_only(folder: Path) -> Path:
    folder.mkdir()
    folder.chmod(0o500)
    return folder


def _cli(args: list[str], env_extra: dict[str, str] | None = None, **popen) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    env.pop("TRITON_INTERPRET", None)
    return subprocess.Popen(
        [sys.executable, "-m", "moecap_kernels.profile", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        **popen,
    )


@pytest.fixture(scope="module")
def bad_input_runs(tmp_path_factory) -> dict[str, tuple[int, str, str, Path]]:
    """Every BAD case run once, two at a time: {case: (exit code, stdout, stderr, scratch folder)}."""
    load_extension()  # built once here, not raced for by the subprocesses

    def one(case: str) -> tuple[int, str, str, Path]:
        folder = tmp_path_factory.mktemp(case.replace(" ", "_").replace("*", "^"))
        make_args, _ = BAD[case]
        env = ENV[case](folder) if case in ENV else None
        proc = _cli([*FAST, *make_args(folder)], env)
        out, err = proc.communicate(timeout=300)
        return proc.returncode, out, err, folder

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(BAD, pool.map(one, BAD), strict=True))


def test_the_table_covers_at_least_thirty_kinds() -> None:
    assert len(BAD) >= 30


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_exit_2_and_no_traceback(bad_input_runs, case: str) -> None:
    if case == "no gpu" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU, so --device cuda is not bad input here")
    code, out, err, folder = bad_input_runs[case]
    _, needle = BAD[case]
    assert "Traceback" not in err and "Traceback" not in out, err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith("moecap: error:") and needle in lines[0], lines[0]
    assert ".tmp" not in lines[0]  # the user's path, never a temporary file's
    if case == "good json, bad csv":
        assert not (folder / "ok.json").exists()  # checked before anything ran: nothing written


# --- Ctrl-C --------------------------------------------------------------------------------------


def _interrupt(proc: subprocess.Popen, when: str | float, timeout: float = 120) -> tuple[int, str, str]:
    """SIGINT ``proc`` after ``when`` seconds, or once a stdout line starts with ``when``."""
    if isinstance(when, str):
        deadline = time.monotonic() + timeout
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith(when) or time.monotonic() > deadline:
                break
    else:
        time.sleep(when)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


@pytest.mark.parametrize("when", [0.3, 1.0, "calibrating", "tiny"])
def test_ctrl_c_at_any_moment_is_one_line_and_exit_130(tmp_path: Path, when: str | float) -> None:
    """During the imports (0.3 s, 1 s), the calibration, and the timed rows of a long run."""
    config = tiny_config(tmp_path / "tiny")
    peaks = [] if when == "calibrating" else PEAKS
    env = {"MOECAP_CACHE_DIR": str(tmp_path / "cache"), "MOECAP_NO_EXTENSION": "1"}
    out_json = tmp_path / "o.json"
    proc = _cli(["--config", str(config), "--reps", "10000", "--json", str(out_json), *peaks], env)
    code, out, err = _interrupt(proc, when)
    assert "Traceback" not in err and "Traceback" not in out, err
    assert code == 130 and err.strip().splitlines() == ["moecap: interrupted"], err
    assert not out_json.exists() and not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


# --- a strict JSON document ----------------------------------------------------------------------


def test_written_json_is_strict(tmp_path: Path) -> None:
    """No NaN or Infinity literals: a strict parser reads the file."""
    out_json = tmp_path / "o.json"
    proc = _cli(
        ["--config", str(tiny_config(tmp_path / "m")), "--batch", "2", "--json", str(out_json), *FAST]
    )
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err

    def refuse(constant: str) -> None:
        raise AssertionError(f"non-finite literal {constant} in the JSON")

    doc = json.loads(out_json.read_text(), parse_constant=refuse)
    assert "nulls" not in doc and doc["results"][0]["peak"]["caveat"] is None
