"""Session-wide fixtures: checkpoints are built once per test run (from offline artefacts, see
support/checkpoints.py) and converted once; tests share the results read-only. Helpers that tests
import live in tests/support/."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from tests.support.checkpoints import make_tiny_mixtral, make_upcycled_smollm

# A test run started in the background by a shell without job control (`nohup ... &`) inherits SIGINT
# ignored, and so would every localmix it starts: the Ctrl-C tests would see a run that never stops. A
# handler of our own is reset to the default in children at exec, where Python then raises KeyboardInterrupt.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory, monkeypatch):
    """Keep every test out of the user's model store and Hugging Face cache, and offline."""
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("LOCALMIX_HOME", str(home))
    monkeypatch.setenv("HF_HOME", str(home / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def anyio_backend():
    return "asyncio"


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


@pytest.fixture(scope="session")
def smol(upcycled_gguf) -> Path:
    """The upcycled SmolLM2 at Q4_K_M: a real MoE model that answers questions."""
    return upcycled_gguf("Q4_K_M")


@pytest.fixture(scope="session")
def tiny_split(tiny_gguf, tmp_path_factory) -> list[Path]:
    """The tiny Mixtral at Q4_K_M split in two by gguf-py's split writer, the cut inside layer 1's
    experts: ffn_down_exps in part 1, ffn_gate_exps and ffn_up_exps in part 2."""
    import gguf

    from tests.support.ggufs import split_copy

    src = tiny_gguf("Q4_K_M")
    names = [t.name for t in gguf.GGUFReader(src).tensors]
    folder = tmp_path_factory.mktemp("split")
    return split_copy(src, folder / "tiny-mixtral-Q4_K_M.gguf", first_part_tensors=names.index("blk.1.ffn_gate_exps.weight"))


@pytest.fixture(scope="module")
def smol_model(smol):
    """The smol model loaded for one test module's servers, with a 1024-token context (a long message
    overflows it): a server.app.Model (tests/support/server.py)."""
    from tests.support.server import loaded

    model = loaded(smol, ctx=1024)
    yield model
    model.backend.close()


@pytest.fixture(scope="module")
def smol_url(smol_model):
    """The base URL of a real localmix server on 127.0.0.1 serving `smol_model`."""
    from tests.support.server import serving

    with serving(smol_model) as url:
        yield url
