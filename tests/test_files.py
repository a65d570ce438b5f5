"""Result files: checked up front, written all or none, errors naming the user's path; the cache folder."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from moecap_kernels import files
from moecap_kernels.errors import UserError


def _no_temps(folder: Path) -> bool:
    return not [p for p in folder.rglob("*") if p.name.endswith(".tmp")]


def test_check_writable_accepts_a_file_in_an_existing_folder(tmp_path: Path) -> None:
    assert files.check_writable(str(tmp_path / "o.json"), "--json") == tmp_path / "o.json"
    assert list(tmp_path.iterdir()) == []  # the probe is gone


@pytest.mark.parametrize(
    ("where", "needle"),
    [("", "empty string"), ("{p}", "is a folder"), ("{p}/missing/o.json", "does not exist")],
)
def test_check_writable_refuses_with_one_line(tmp_path: Path, where: str, needle: str) -> None:
    with pytest.raises(UserError, match=needle) as err:
        files.check_writable(where.format(p=tmp_path), "--json")
    assert str(err.value).startswith("--json") and "\n" not in str(err.value)


def test_write_all_atomic_writes_every_file_or_none(tmp_path: Path) -> None:
    files.write_all_atomic({tmp_path / "a.json": "A", tmp_path / "b.csv": "B"})
    assert (tmp_path / "a.json").read_text() == "A" and (tmp_path / "b.csv").read_text() == "B"
    with pytest.raises(OSError) as err:
        files.write_all_atomic({tmp_path / "a.json": "new A", tmp_path / "gone" / "c.csv": "C"})
    assert err.value.filename == str(tmp_path / "gone" / "c.csv")  # the user's path, not a temp file
    assert (tmp_path / "a.json").read_text() == "A"  # untouched: the second file could not be written
    assert _no_temps(tmp_path)


def test_a_failed_replace_names_the_target_and_leaves_no_temp(tmp_path: Path, monkeypatch) -> None:
    def refuse(src: str, dst: str) -> None:
        raise PermissionError(errno.EACCES, "Permission denied", src)

    monkeypatch.setattr(files.os, "replace", refuse)
    with pytest.raises(OSError) as err:
        files.write_atomic(tmp_path / "o.json", "text")
    assert err.value.filename == str(tmp_path / "o.json") and err.value.strerror == "Permission denied"
    assert list(tmp_path.iterdir()) == []


def test_cache_root_that_is_a_file_is_a_user_error(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "afile").write_text("x")
    monkeypatch.setenv("MOECAP_CACHE_DIR", str(tmp_path / "afile"))
    with pytest.raises(UserError, match=r"MOECAP_CACHE_DIR .* is a file"):
        files.check_cache_root()
    monkeypatch.setenv("MOECAP_CACHE_DIR", str(tmp_path / "afile" / "below"))
    with pytest.raises(UserError, match="is a file"):
        files.check_cache_root()
    monkeypatch.setenv("MOECAP_CACHE_DIR", str(tmp_path / "new" / "folder"))
    assert files.check_cache_root() == tmp_path / "new" / "folder"  # may be made later
