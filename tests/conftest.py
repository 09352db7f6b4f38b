"""Session-wide fixtures: checkpoints are built once per test run (from offline artefacts, see
fixtures.py) and converted once; tests share the results read-only."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from fixtures import make_tiny_mixtral, make_upcycled_smollm  # noqa: E402


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory, monkeypatch):
    """Keep every test out of the user's model store and Hugging Face cache, and offline."""
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("LOCALMIX_HOME", str(home))
    monkeypatch.setenv("HF_HOME", str(home / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Path:
    """Random Mixtral, 4 layers, hidden 256 (all row lengths divide by 256), Mixtral 8x22B's v3 tokenizer."""
    return make_tiny_mixtral(tmp_path_factory.mktemp("ckpt") / "tiny-mixtral-v3")


@pytest.fixture(scope="session")
def tiny_v1(tmp_path_factory) -> Path:
    """The same with Mixtral 8x7B's v1 tokenizer."""
    return make_tiny_mixtral(tmp_path_factory.mktemp("ckpt") / "tiny-mixtral-v1", tokenizer="v1", layers=2)


@pytest.fixture(scope="session")
def upcycled(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct as an 8-expert Mixtral (real weights; hidden 576 is not a multiple of 256)."""
    return make_upcycled_smollm(tmp_path_factory.mktemp("ckpt") / "smollm2-moe")


class Converted:
    """Conversions of one checkpoint, made on first request and shared by all tests."""

    def __init__(self, src: Path, out_dir: Path):
        self.src, self.out_dir, self._done = src, out_dir, {}

    def __call__(self, out_type: str) -> Path:
        if out_type not in self._done:
            from quantize.convert import convert

            path = self.out_dir / f"{self.src.name}-{out_type}.gguf"
            convert(self.src, path, out_type)
            self._done[out_type] = path
        return self._done[out_type]


@pytest.fixture(scope="session")
def tiny_gguf(tiny, tmp_path_factory) -> Converted:
    return Converted(tiny, tmp_path_factory.mktemp("gguf"))


@pytest.fixture(scope="session")
def upcycled_gguf(upcycled, tmp_path_factory) -> Converted:
    return Converted(upcycled, tmp_path_factory.mktemp("gguf"))


def llama_quantize(src: Path, dst: Path, ftype: int) -> None:
    """llama.cpp's own llama-quantize (llama_model_quantize), the oracle for our recipe and bytes."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = os.cpu_count() or 1
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    assert rc == 0, f"llama_model_quantize failed with {rc}"


def run_cli(*args: str, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    """Run `localmix ...` as a user would, in a child process."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "localmix", *args], capture_output=True, text=True, env=full_env, timeout=600, **kw
    )
