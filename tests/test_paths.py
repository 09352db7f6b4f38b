"""Where localmix keeps things: a LOCALMIX_HOME (or a store folder) that is a file is one line from any
command, never a traceback from whoever first makes a folder in it."""

import os
from pathlib import Path

import pytest

from localmix.errors import LocalmixError
from localmix.paths import ensure_dir, home, models_dir
from tests.support.cli import one_line_error, run_cli


def test_home_is_absolute_and_models_are_made(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LOCALMIX_HOME", "rel")
    assert home() == tmp_path / "rel" and models_dir() == tmp_path / "rel" / "models" and models_dir().is_dir()


def test_a_home_that_is_a_file(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    monkeypatch.setenv("LOCALMIX_HOME", str(tmp_path / "file"))
    with pytest.raises(LocalmixError, match="is not a folder"):
        home()
    for args in (("list",), ("rm", "x", "--yes"), ("info", "x")):
        r = run_cli(*args, env={"LOCALMIX_HOME": str(tmp_path / "file")})
        assert one_line_error(r, f"LOCALMIX_HOME={tmp_path / 'file'} is not a folder"), (args, r.stderr)
    assert one_line_error(run_cli("pull", "acme/x-GGUF", env={"LOCALMIX_HOME": str(tmp_path / "file")}), "")


def test_a_store_folder_that_is_a_file_or_a_dangling_link(tmp_path, monkeypatch):
    monkeypatch.setenv("LOCALMIX_HOME", str(tmp_path))
    (tmp_path / "models").write_text("x")
    assert one_line_error(run_cli("list"), "the model store"), run_cli("list").stderr
    (tmp_path / "models").unlink()
    os.symlink(tmp_path / "gone", tmp_path / "models")
    assert one_line_error(run_cli("list"), "is not a folder")


def test_ensure_dir(tmp_path):
    assert ensure_dir(tmp_path / "a" / "b", "x") == tmp_path / "a" / "b"
    (tmp_path / "f").write_text("x")
    with pytest.raises(LocalmixError, match=r"cannot make x .*/f/g: Not a directory"):
        ensure_dir(Path(tmp_path / "f" / "g"), "x")
    with pytest.raises(LocalmixError, match="x .* is not a folder"):
        ensure_dir(tmp_path / "f", "x")
