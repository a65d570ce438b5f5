"""How a command ends: the exit code and the one stderr line for each way of failing."""

from __future__ import annotations

import errno
import os
import signal

import pytest

from moecap_kernels.errors import UserError
from moecap_kernels.exits import Interrupt, run_cli


def _raise(exc: BaseException):
    def body() -> int:
        raise exc

    return body


@pytest.mark.parametrize(
    ("exc", "code", "line"),
    [
        (UserError("no such model"), 2, "moecap: error: no such model"),
        (FileNotFoundError(errno.ENOENT, "No such file or directory", "out/o.json"), 2,
         "moecap: error: No such file or directory: out/o.json"),
        (MemoryError(), 2, "moecap: error: out of memory; pick a smaller model, batch or dtype"),
        (KeyboardInterrupt(), 130, "moecap: interrupted"),
        (ZeroDivisionError("division by zero"), 1,
         "moecap: internal error: ZeroDivisionError: division by zero (MOECAP_TRACEBACK=1 shows where)"),
    ],
)  # fmt: skip
def test_each_failure_is_one_line_and_its_exit_code(capsys, monkeypatch, exc, code, line) -> None:
    monkeypatch.delenv("MOECAP_TRACEBACK", raising=False)
    assert run_cli(_raise(exc)) == code
    out, err = capsys.readouterr()
    assert err.splitlines() == [line] and out == ""


def test_a_bug_shows_its_traceback_when_asked(monkeypatch) -> None:
    monkeypatch.setenv("MOECAP_TRACEBACK", "1")
    with pytest.raises(ZeroDivisionError):
        run_cli(_raise(ZeroDivisionError("x")))


def test_success_is_silent(capsys) -> None:
    assert run_cli(lambda: 0) == 0
    assert capsys.readouterr() == ("", "")


def test_a_swallowed_ctrl_c_still_ends_as_an_interrupt(capsys) -> None:
    """A library that catches every exception (KeyboardInterrupt included) does not hide Ctrl-C."""

    def body() -> int:
        try:
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(1000):  # the handler runs between bytecodes
                pass
        except BaseException:  # what such a library does
            pass
        return 0

    assert run_cli(body) == 130
    assert capsys.readouterr().err.splitlines() == ["moecap: interrupted"]


def test_the_previous_sigint_handler_is_restored() -> None:
    before = signal.getsignal(signal.SIGINT)
    run_cli(lambda: 0)
    assert signal.getsignal(signal.SIGINT) is before
    assert Interrupt.seen is False


def test_deferred_holds_ctrl_c_until_the_block_ends() -> None:
    reached_end = False
    with pytest.raises(KeyboardInterrupt), Interrupt.handled():
        with Interrupt.deferred():
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(1000):
                pass
            reached_end = True
        for _ in range(1000):
            pass
    assert reached_end
