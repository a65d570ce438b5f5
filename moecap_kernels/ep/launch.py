"""Ranks as processes: the process group of a torchrun-started rank, and the self-launch of N local
ranks through torch's own launcher (``torch.distributed.launcher``) when ``--ep N`` runs alone.

Failure ends every rank: a rank that raises prints its one line and exits (2 for bad input); the
launcher then stops the others; a rank blocked in a collective gives up after ``--ep-timeout``
seconds. The launching process prints one line for a rank that died without saying why (a signal).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import logging
import os
import re
import signal
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from moecap_kernels.errors import UserError
from moecap_kernels.hardware import Peaks

CHILD_ENV = "MOECAP_EP_CHILD"  # set by the self-launch: the parent reports deaths and Ctrl-C
PEAKS_ENV = "MOECAP_EP_PEAKS"  # set by the self-launch: a JSON file of the peaks the parent resolved


def launched_rank() -> bool:
    """Whether this process is a rank started by torchrun or by the self-launch."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


def checks_memory() -> bool:
    """Whether this process checks that the ranks fit: the self-launching one, or under torchrun
    each node's local rank 0 (its other ranks wait for it in the rendezvous)."""
    if not launched_rank():
        return True
    return not os.environ.get(CHILD_ENV) and os.environ.get("LOCAL_RANK") == "0"


def self_launch(ranks: int, argv: Sequence[str], cores: int, peaks: Mapping[str, Peaks]) -> int:
    """Run ``python -m moecap_kernels.profile ARGV`` as ``ranks`` local ranks; their exit code.

    ``peaks`` (by compute dtype) were resolved here, with every core, before the ranks share them;
    rank 0 reads them back (``inherited_peaks``) instead of measuring the machine with its share."""
    with tempfile.TemporaryDirectory(prefix="moecap-ep-") as folder:
        path = Path(folder) / "peaks.json"
        path.write_text(json.dumps({dtype: dataclasses.asdict(p) for dtype, p in peaks.items()}))
        os.environ[PEAKS_ENV] = str(path)
        try:
            return _launch(ranks, argv, cores)
        finally:
            os.environ.pop(PEAKS_ENV, None)


def inherited_peaks() -> dict[str, Peaks] | None:
    """The peaks the launching process resolved, or None when this rank was not self-launched."""
    path = os.environ.get(PEAKS_ENV)
    if not path:
        return None
    return {dtype: Peaks(**fields) for dtype, fields in json.loads(Path(path).read_text()).items()}


def _launch(ranks: int, argv: Sequence[str], cores: int) -> int:
    os.environ.setdefault("LOGLEVEL", "CRITICAL")  # torch's elastic loggers read it when made
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch.distributed"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    os.environ[CHILD_ENV] = "1"
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, cores // ranks)))
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=ranks,
        run_id=f"moecap-{os.getpid()}",
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        max_restarts=0,
        monitor_interval=0.1,
    )
    try:
        elastic_launch(config, sys.executable)("-m", "moecap_kernels.profile", *argv)
    except ChildFailedError as exc:
        return _failure_code(exc)
    except SignalException as exc:  # Ctrl-C (or a TERM) reached the launcher: the ranks were stopped
        return 130 if exc.sigval == signal.SIGINT else 2
    return 0


def _failure_code(exc: object) -> int:
    """The run's exit code from the ranks' failures; one line for a rank that died silently."""
    failures = getattr(exc, "failures", {})
    codes = {rank: f.exitcode for rank, f in failures.items()}
    for wanted in (130, 2, 1):  # a rank that said why: it printed its own line
        if wanted in codes.values():
            return wanted
    dead = [r for r, c in codes.items() if c is not None and c < 0 and -c != signal.SIGTERM]
    rank = dead[0] if dead else next(iter(codes), "?")
    code = codes.get(rank)
    how = (
        f"signal {signal.Signals(-code).name}" if isinstance(code, int) and code < 0 else f"exit code {code}"
    )
    from moecap_kernels.exits import say

    say(f"moecap: error: rank {rank} died ({how}); every rank was stopped")
    return 2


def init_process_group(ranks: int, device_type: str, timeout_s: float) -> tuple[int, str]:
    """Join the ranks' group (gloo on CPU, NCCL on CUDA); (this rank, its device)."""
    import torch
    import torch.distributed as dist

    world = int(os.environ["WORLD_SIZE"])
    if world != ranks:
        raise UserError(f"--ep {ranks} but the launcher started {world} ranks: make them agree")
    rank, local = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if os.environ.get(CHILD_ENV):  # the parent reports Ctrl-C; a rank stopped by it stays quiet
        signal.signal(signal.SIGINT, lambda signum, frame: os._exit(130))
    device = "cpu"
    if device_type == "cuda":
        if local >= torch.cuda.device_count():
            raise UserError(f"rank {rank}: local rank {local} has no GPU ({torch.cuda.device_count()} here)")
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    dist.init_process_group(
        "nccl" if device_type == "cuda" else "gloo", timeout=datetime.timedelta(seconds=timeout_s)
    )
    return rank, device


_LOST = re.compile(r"gloo|nccl|connection|timed? ?out|peer|socket|broken pipe", re.IGNORECASE)


@contextlib.contextmanager
def as_one_line(rank: int, timeout_s: float) -> Iterator[None]:
    """A lost rank or a collective's timeout as one line (exit 2) naming this rank."""
    import torch.distributed as dist

    try:
        yield
    except UserError as exc:
        raise UserError(f"rank {rank}: {exc}") from None
    except (RuntimeError, dist.DistError) as exc:
        text = re.sub(r"\[[^\]]*\]:?\s*", "", (str(exc).splitlines() or [type(exc).__name__])[0])
        if isinstance(exc, dist.DistError) or _LOST.search(text):
            raise UserError(
                f"rank {rank}: lost the other ranks (a rank stopped, or a collective waited over "
                f"{timeout_s:g} s): {text[:160]}"
            ) from None
        raise
    finally:
        if dist.is_initialized():
            with contextlib.suppress(Exception):
                dist.destroy_process_group()
