"""benchmarks/gpu_check.sh fits the GPU machines it is for, by construction: each part's steps are
all under `timeout`, their limits (and the 5 s a kill may take) add up to under 8 minutes, and a part
writes at most 7 files. Read from the script's own dry run (DRY=1), so the test sees what it runs."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.sh"
MAX_SECONDS, MAX_FILES = 8 * 60, 7


def dry_run(part: int, results: Path) -> list[tuple[int, str]]:
    env = {**os.environ, "PART": str(part), "DRY": "1"}
    done = subprocess.run(["bash", str(SCRIPT), str(results)], capture_output=True, text=True, env=env,
                          timeout=60, check=False)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    steps = [line.split(" ", 2) for line in done.stdout.splitlines() if line.startswith("DRY ")]
    return [(int(limit), command) for _, limit, command in steps]


@pytest.mark.skipif(
    shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and timeout"
)
@pytest.mark.parametrize("part", [1, 2])
def test_each_part_is_bounded_in_time_and_files(tmp_path, part):
    results = tmp_path / "results"
    steps = dry_run(part, results)
    assert len(steps) >= 6
    assert sum(limit + 5 for limit, _ in steps) <= MAX_SECONDS - 10
    written = set()
    for _, command in steps:
        for flag in ("--json", "--markdown", "--junit-xml"):
            written.update(re.findall(rf"{flag}[= ]({re.escape(str(results))}/\S+)", command))
    assert 3 <= len(written) <= MAX_FILES
    assert not any(" -x" in command.split(" --")[0] or command.endswith(" -x") for _, command in steps)
    assert list(results.iterdir()) == []  # a dry run writes nothing


def test_every_command_of_the_script_runs_under_a_timeout():
    body = SCRIPT.read_text().split('step "machine"', 1)[1]
    bare = [
        line.strip() for line in body.splitlines() if line.strip().startswith(("$PY", "python", "nvidia-smi"))
    ]
    assert bare == []  # each is `run LIMIT …` instead
    assert body.count("run $L_") >= 12
