"""How a command of this package ends: an exit code, and at most one line on stderr.

- 0: done; 2: bad input (``UserError``, an unreadable or unwritable file, memory that would not
  suffice), with ``moecap: error: …``; 130: Ctrl-C, at any moment, with ``moecap: interrupted``;
  1: a bug in the package, with ``moecap: internal error: …`` (``MOECAP_TRACEBACK=1`` lets the
  traceback through instead).

Imports nothing heavy: a command installs this before it imports torch.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Callable, Iterator

from moecap_kernels.errors import UserError


def say(line: str) -> None:
    """One line on stderr."""
    with contextlib.suppress(OSError, ValueError):  # a closed or broken stderr has nothing to say to
        print(line, file=sys.stderr, flush=True)


class Interrupt:
    """Ctrl-C as one line and exit code 130, whatever it interrupts.

    Imports hold it back (``deferred``) and take it once they are done: a KeyboardInterrupt inside
    ``import torch`` can be swallowed by library code, leave torch half-initialised (a later abort),
    or mark the interpreter to die of SIGINT at exit. Elsewhere the handler raises it and notes it,
    ``check`` raises it again at the next checkpoint should a library have caught it, and the exit
    code is 130 whatever became of the first.
    """

    seen = False

    @classmethod
    def handler(cls, signum: int, frame: object) -> None:
        cls.seen = True
        raise KeyboardInterrupt

    @classmethod
    def check(cls) -> None:
        if cls.seen:
            raise KeyboardInterrupt

    @staticmethod
    @contextlib.contextmanager
    def deferred() -> Iterator[None]:
        """Block SIGINT for the block; one that arrived meanwhile is delivered as it ends."""
        if not hasattr(signal, "pthread_sigmask"):  # Windows: nothing to hold back with
            yield
            return
        before = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            yield
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, before)

    @classmethod
    @contextlib.contextmanager
    def handled(cls) -> Iterator[None]:
        """Install the handler for the block (when on the main thread) and restore the old one."""
        cls.seen = False
        try:
            previous = signal.signal(signal.SIGINT, cls.handler)
        except ValueError:  # not the main thread: leave signals alone
            yield
            return
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)


def _is_device_oom(exc: BaseException) -> bool:
    torch = sys.modules.get("torch")  # never imported here: an interrupted import must stay so
    oom = getattr(torch, "OutOfMemoryError", None)
    return isinstance(oom, type) and isinstance(exc, oom)


def _os_error(exc: OSError) -> str:
    where = f": {exc.filename}" if exc.filename else ""
    return f"{exc.strerror or exc}{where}"


def run_cli(body: Callable[[], int]) -> int:
    """``body()``'s exit code, or the code and one stderr line of how it failed (module docstring)."""
    with Interrupt.handled():
        try:
            code = _exit_code(body)
        except KeyboardInterrupt:  # a second Ctrl-C, while a failure was being reported
            code = 130
        if Interrupt.seen:
            code = 130
        if code == 130:
            with contextlib.suppress(KeyboardInterrupt):
                say("moecap: interrupted")
        return code


def _exit_code(body: Callable[[], int]) -> int:
    try:
        return body()
    except KeyboardInterrupt:
        return 130
    except UserError as exc:
        say(f"moecap: error: {exc}")
        return 2
    except MemoryError:
        say("moecap: error: out of memory; pick a smaller model, batch or dtype")
        return 2
    except OSError as exc:  # an output that became unwritable, an unreadable file
        say(f"moecap: error: {_os_error(exc)}")
        return 2
    except Exception as exc:
        if Interrupt.seen:  # what a half-finished import left behind: the interrupt is the news
            return 130
        if _is_device_oom(exc):
            say(f"moecap: error: out of device memory: {str(exc).splitlines()[0]}")
            return 2
        if os.environ.get("MOECAP_TRACEBACK", "").strip() not in ("", "0"):
            raise
        first = (str(exc).splitlines() or [""])[0][:200]
        say(f"moecap: internal error: {type(exc).__name__}: {first} (MOECAP_TRACEBACK=1 shows where)")
        return 1
