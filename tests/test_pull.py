"""`localmix pull` against a small hub served on 127.0.0.1 (HF_ENDPOINT): the real huggingface-hub
client code runs; nothing leaves the machine."""

import os
from pathlib import Path

import pytest
from conftest import run_cli
from fake_hub import FakeHub


@pytest.fixture
def hub(tmp_path, tiny_gguf):
    q4, q8 = tiny_gguf("Q4_K_M"), tiny_gguf("Q8_0")
    data = q8.read_bytes()
    half = tmp_path / "half1"
    half.write_bytes(data[: len(data) // 2])
    rest = tmp_path / "half2"
    rest.write_bytes(data[len(data) // 2:])
    with FakeHub() as h:
        h.add("acme/tiny-mixtral-GGUF", {
            "README.md": q4.parent / "README.md" if (q4.parent / "README.md").exists() else _readme(tmp_path),
            "tiny-mixtral-Q4_K_M.gguf": q4,
            "tiny-mixtral-Q8_0-00001-of-00002.gguf": half,
            "tiny-mixtral-Q8_0-00002-of-00002.gguf": rest,
        })
        h.add("acme/gated-GGUF", {"x-Q4_K_M.gguf": q4})
        h.gated.add("acme/gated-GGUF")
        yield h


def _readme(tmp_path):
    p = tmp_path / "README.md"
    p.write_text("# tiny\n")
    return p


def env(hub, **extra):
    return {"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_XET": "1", **extra}


def test_pull_a_quant_links_the_cache(hub, tiny_gguf):
    r = run_cli("pull", "acme/tiny-mixtral-GGUF", env=env(hub))
    assert r.returncode == 0, r.stderr
    stored = Path(os.environ["LOCALMIX_HOME"]) / "models" / "tiny-mixtral-Q4_K_M.gguf"
    assert stored.is_symlink() and stored.read_bytes() == tiny_gguf("Q4_K_M").read_bytes()
    assert "hf" in str(stored.resolve())  # the only copy is in the Hugging Face cache
    listed = run_cli("list", "--json")
    assert "tiny-mixtral-Q4_K_M" in listed.stdout
    # a second pull is instant and offline mode finds the cache
    r = run_cli("pull", "acme/tiny-mixtral-GGUF", "Q4_K_M", "--force", env={**env(hub), "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr


def test_pull_a_split_model_fetches_every_part(hub, tiny_gguf):
    r = run_cli("pull", "acme/tiny-mixtral-GGUF", "q8_0", env=env(hub))
    assert r.returncode == 0, r.stderr
    models = Path(os.environ["LOCALMIX_HOME"]) / "models"
    parts = sorted(models.glob("tiny-mixtral-Q8_0-*-of-00002.gguf"))
    assert len(parts) == 2
    assert parts[0].read_bytes() + parts[1].read_bytes() == tiny_gguf("Q8_0").read_bytes()


def test_interrupted_download_resumes(hub, tiny_gguf):
    """The connection drops after 12 MB, once: the download goes on from what was saved (huggingface-hub
    saves in chunks of DOWNLOAD_CHUNK_SIZE), with a Range request, not from the start."""
    from huggingface_hub.constants import DOWNLOAD_CHUNK_SIZE

    assert tiny_gguf("Q4_K_M").stat().st_size > 12_000_000 > DOWNLOAD_CHUNK_SIZE
    hub.fail_after["tiny-mixtral-Q4_K_M.gguf"] = 12_000_000
    first = run_cli("pull", "acme/tiny-mixtral-GGUF", env=env(hub))
    if first.returncode != 0:  # huggingface-hub gave up: the next pull resumes from the partial file
        assert "Traceback" not in first.stderr
        r = run_cli("pull", "acme/tiny-mixtral-GGUF", env=env(hub))
        assert r.returncode == 0, r.stderr
    ranges = [rng for method, path, rng in hub.requests if method == "GET" and path.endswith("Q4_K_M.gguf") and rng]
    assert ranges and ranges[-1] == f"bytes={DOWNLOAD_CHUNK_SIZE}-"
    stored = Path(os.environ["LOCALMIX_HOME"]) / "models" / "tiny-mixtral-Q4_K_M.gguf"
    assert stored.read_bytes() == tiny_gguf("Q4_K_M").read_bytes()


@pytest.mark.parametrize("args, expect", [
    (("acme/nope-GGUF",), "no such repo"),
    (("acme/tiny-mixtral-GGUF", "Q2_K"), "no Q2_K file in this repo (it has: Q4_K_M, Q8_0"),
    (("acme/gated-GGUF",), "is gated"),
])
def test_pull_errors_are_one_line(hub, args, expect):
    r = run_cli("pull", *args, env=env(hub))
    assert r.returncode == 1 and expect in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_offline_and_not_cached(hub):
    r = run_cli("pull", "acme/tiny-mixtral-GGUF", env={**env(hub), "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 1 and "offline" in r.stderr and "Traceback" not in r.stderr


def test_repo_names_where_a_model_is_taken(hub):
    # not in the store and no terminal to ask in: one line saying how to fetch it
    r = run_cli("plan", "acme/tiny-mixtral-GGUF:Q4_K_M", "--json", env=env(hub), stdin=devnull())
    assert r.returncode == 1 and "localmix pull acme/tiny-mixtral-GGUF Q4_K_M" in r.stderr
    assert run_cli("pull", "acme/tiny-mixtral-GGUF", env=env(hub)).returncode == 0
    r = run_cli("plan", "acme/tiny-mixtral-GGUF:Q4_K_M", "--json", env=env(hub), stdin=devnull())
    assert r.returncode == 0, r.stderr


def test_pull_a_safetensors_repo_quantizes_it(tmp_path, tiny):
    with FakeHub() as h:
        h.add("acme/tiny-mixtral", {p.name: p for p in sorted(tiny.iterdir()) if p.is_file()})
        r = run_cli("pull", "acme/tiny-mixtral", "Q4_K_M", env=env(h))
        assert r.returncode == 0, r.stderr
    stored = Path(os.environ["LOCALMIX_HOME"]) / "models" / "acme--tiny-mixtral-Q4_K_M.gguf"
    assert stored.is_file()
    from gguf_compare import metadata

    assert metadata(stored)["general.source.huggingface.repository"] == "acme/tiny-mixtral"


def devnull():
    import subprocess

    return subprocess.DEVNULL
