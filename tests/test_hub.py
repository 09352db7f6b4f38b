"""`localmix pull` against a small hub served on 127.0.0.1 (HF_ENDPOINT): the real huggingface-hub client
code runs; nothing leaves the machine. Split models are real split GGUFs (gguf-py's split writer)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from localmix.errors import LocalmixError
from localmix.hub import choose_files
from tests.support.cli import one_line_error, run_cli
from tests.support.fake_hub import FakeHub
from tests.support.ggufs import split_copy

REPO_FILES = ["README.md", "Mixtral-Q4_K_M.gguf", "Mixtral-Q8_0-00001-of-00002.gguf", "Mixtral-Q8_0-00002-of-00002.gguf",
              "IQ3/Mixtral-IQ3_M.gguf"]


def test_choose_files():
    assert choose_files(REPO_FILES, "Q4_K_M") == ["Mixtral-Q4_K_M.gguf"]
    assert choose_files(REPO_FILES, "q8_0") == ["Mixtral-Q8_0-00001-of-00002.gguf", "Mixtral-Q8_0-00002-of-00002.gguf"]
    assert choose_files(REPO_FILES, "Mixtral-Q8_0-00002-of-00002.gguf")[0].endswith("00001-of-00002.gguf")  # a part: all
    assert choose_files(REPO_FILES, "IQ3_M") == ["IQ3/Mixtral-IQ3_M.gguf"]
    with pytest.raises(LocalmixError, match=r"no Q2_K file in this repo \(it has: IQ3_M, Q4_K_M, Q8_0\)"):
        choose_files(REPO_FILES, "Q2_K")
    with pytest.raises(LocalmixError, match="has 1 of its 2 parts"):
        choose_files(REPO_FILES[:3], "Q8_0")
    with pytest.raises(LocalmixError, match="matches several files"):
        choose_files(["a-Q4_K_M.gguf", "b-Q4_K_M.gguf"], "Q4_K_M")


@pytest.fixture(scope="module")
def q8_split(tiny_gguf, tmp_path_factory):
    """The tiny Mixtral at Q8_0, split after its 3 whole-model tensors: part 2 (the layers) is 14 MB."""
    return split_copy(tiny_gguf("Q8_0"), tmp_path_factory.mktemp("q8") / "tiny-mixtral-Q8_0.gguf", first_part_tensors=3)


@pytest.fixture
def hub(tmp_path, tiny_gguf, q8_split):
    readme = tmp_path / "README.md"
    readme.write_text("# tiny\n")
    with FakeHub() as h:
        h.add("acme/tiny-mixtral-GGUF", {"README.md": readme, "tiny-mixtral-Q4_K_M.gguf": tiny_gguf("Q4_K_M"),
                                         **{p.name: p for p in q8_split}})
        h.add("acme/sub-GGUF", {"Q4/deep/tiny-Q4_K_M.gguf": tiny_gguf("Q4_K_M")})
        h.add("acme/gated-GGUF", {"x-Q4_K_M.gguf": tiny_gguf("Q4_K_M")})
        h.gated.add("acme/gated-GGUF")
        yield h


def env(hub, **extra):
    return {"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_XET": "1", **extra}


def store() -> Path:
    return Path(os.environ["LOCALMIX_HOME"]) / "models"


def listed() -> dict:
    r = run_cli("list", "--json")
    assert r.returncode == 0, r.stderr
    return {x["name"]: x for x in json.loads(r.stdout)}


def test_pull_a_quant(hub, tiny_gguf):
    r = run_cli("pull", "acme/tiny-mixtral-GGUF", env=env(hub))
    assert r.returncode == 0, r.stderr
    stored = store() / "tiny-mixtral-Q4_K_M.gguf"
    assert stored.read_bytes() == tiny_gguf("Q4_K_M").read_bytes() and not stored.is_symlink()
    assert listed()["tiny-mixtral-Q4_K_M"]["error"] is None and not list(store().glob(".partial/*"))
    # again: it is there, nothing is fetched
    before = len(hub.requests)
    assert run_cli("pull", "acme/tiny-mixtral-GGUF", "Q4_K_M", env=env(hub)).returncode == 0
    assert not [r for r in hub.requests[before:] if r[0] == "GET" and r[1].endswith(".gguf")]


def test_a_file_in_the_hugging_face_cache_is_linked_not_copied(hub, tiny_gguf):
    fetch = "from huggingface_hub import hf_hub_download; hf_hub_download('acme/tiny-mixtral-GGUF', 'tiny-mixtral-Q4_K_M.gguf')"
    subprocess.run([sys.executable, "-c", fetch], env={**os.environ, **env(hub)}, check=True, capture_output=True)
    r = run_cli("pull", "acme/tiny-mixtral-GGUF", env=env(hub))
    assert r.returncode == 0, r.stderr
    stored = store() / "tiny-mixtral-Q4_K_M.gguf"
    assert stored.is_symlink() and "hf" in str(stored.resolve())  # the only copy is in the Hugging Face cache
    r = run_cli("pull", "acme/tiny-mixtral-GGUF", "--force", env={**env(hub), "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr  # offline, from the cache
    # the Hugging Face cache entry is deleted: the link dangles; listed as broken, one line where it is named
    shutil.rmtree(Path(os.environ["HF_HOME"]) / "hub" / "models--acme--tiny-mixtral-GGUF")
    assert listed()["tiny-mixtral-Q4_K_M"]["error"].startswith("a link to a missing file (")
    assert one_line_error(run_cli("info", "tiny-mixtral-Q4_K_M"), "tiny-mixtral-Q4_K_M: a link to a missing file")
    r = run_cli("pull", "acme/tiny-mixtral-GGUF", env=env(hub))  # fetched again, in place of the link
    assert r.returncode == 0 and not stored.is_symlink() and listed()["tiny-mixtral-Q4_K_M"]["error"] is None, r.stderr


def test_pull_a_split_model_fetches_every_part(hub, q8_split):
    r = run_cli("pull", "acme/tiny-mixtral-GGUF", "q8_0", env=env(hub))
    assert r.returncode == 0, r.stderr
    parts = sorted(store().glob("tiny-mixtral-Q8_0-*-of-00002.gguf"))
    assert [p.read_bytes() for p in parts] == [p.read_bytes() for p in q8_split]
    row = listed()["tiny-mixtral-Q8_0"]
    assert row["error"] is None and row["files"] == 2 and row["path"].endswith("00001-of-00002.gguf")
    r = run_cli("plan", "acme/tiny-mixtral-GGUF:Q8_0", "--json", env=env(hub))
    assert r.returncode == 0 and len(json.loads(r.stdout)["model"]["parts"]) == 2
    # a part lost from the store: listed as broken, and the next pull links it again
    parts[1].unlink()
    assert "part 2 of 2" in listed()["tiny-mixtral-Q8_0"]["error"]
    assert run_cli("pull", "acme/tiny-mixtral-GGUF", "Q8_0", env=env(hub)).returncode == 0
    assert listed()["tiny-mixtral-Q8_0"]["error"] is None


def test_an_interrupted_split_pull_is_never_complete_and_resumes(hub, q8_split):
    """The pull is killed while part 2 downloads: nothing is listed as a model; the next pull resumes
    part 2 from what was saved (a Range request), not from the start."""
    from huggingface_hub.constants import DOWNLOAD_CHUNK_SIZE

    part2 = q8_split[1].name
    assert q8_split[1].stat().st_size > 12_000_000 > DOWNLOAD_CHUNK_SIZE
    hub.stall_after[part2] = 12_000_000
    proc = subprocess.Popen([sys.executable, "-m", "localmix", "pull", "acme/tiny-mixtral-GGUF", "Q8_0"],
                            env={**os.environ, **env(hub)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert hub.stalled.wait(120), "part 2 was never requested"
        end = time.time() + 60
        while time.time() < end and not any(p.stat().st_size >= DOWNLOAD_CHUNK_SIZE for p in store().glob(f".partial/{part2}.*")):
            time.sleep(0.1)
        # while it runs: a second pull of the model is refused, a pull of another model leaves its files alone
        live = sorted(store().glob(".partial/*.partial"))
        r = run_cli("pull", "acme/tiny-mixtral-GGUF", "Q8_0", env=env(hub))
        assert one_line_error(r, f"another localmix pull (pid {proc.pid}) is fetching tiny-mixtral-Q8_0"), r.stderr
        assert run_cli("pull", "acme/tiny-mixtral-GGUF", "Q4_K_M", env=env(hub)).returncode == 0
        assert sorted(store().glob(".partial/*.partial")) == live and len(live) == 2
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        hub.release.set()
    assert "tiny-mixtral-Q8_0" not in listed() and not list(store().glob("*Q8_0*.gguf"))  # part 1 is done, but not linked
    r = run_cli("plan", "acme/tiny-mixtral-GGUF:Q8_0", env=env(hub), stdin=subprocess.DEVNULL)
    assert one_line_error(r, "is not in the store; fetch it with: localmix pull acme/tiny-mixtral-GGUF Q8_0")

    r = run_cli("pull", "acme/tiny-mixtral-GGUF", "Q8_0", env=env(hub))
    assert r.returncode == 0, r.stderr
    ranges = [rng for method, path, rng in hub.requests if method == "GET" and path.endswith(part2) and rng]
    assert ranges and ranges[-1] == f"bytes={DOWNLOAD_CHUNK_SIZE}-"
    assert [p.read_bytes() for p in sorted(store().glob("tiny-mixtral-Q8_0-*.gguf"))] == [p.read_bytes() for p in q8_split]
    assert listed()["tiny-mixtral-Q8_0"]["error"] is None
    assert not os.listdir(store() / ".partial")  # the killed pull's lock is gone too


def test_a_dropped_connection_resumes(hub, tiny_gguf):
    """The connection drops after 12 MB, once: the download goes on from what was saved."""
    from huggingface_hub.constants import DOWNLOAD_CHUNK_SIZE

    hub.fail_after["tiny-mixtral-Q4_K_M.gguf"] = 12_000_000
    first = run_cli("pull", "acme/tiny-mixtral-GGUF", env=env(hub))
    if first.returncode != 0:  # huggingface-hub gave up: the next pull resumes from the partial file
        assert one_line_error(first, "download of tiny-mixtral-Q4_K_M.gguf failed"), first.stderr
        assert "tiny-mixtral-Q4_K_M" not in listed()
        r = run_cli("pull", "acme/tiny-mixtral-GGUF", env=env(hub))
        assert r.returncode == 0, r.stderr
    ranges = [rng for method, path, rng in hub.requests if method == "GET" and path.endswith("Q4_K_M.gguf") and rng]
    assert ranges and ranges[-1] == f"bytes={DOWNLOAD_CHUNK_SIZE}-"
    assert (store() / "tiny-mixtral-Q4_K_M.gguf").read_bytes() == tiny_gguf("Q4_K_M").read_bytes()


def test_a_file_in_a_subfolder_gets_a_plain_store_name(hub):
    r = run_cli("pull", "acme/sub-GGUF", "Q4/deep/tiny-Q4_K_M.gguf", env=env(hub))
    assert r.returncode == 0, r.stderr
    assert (store() / "tiny-Q4_K_M.gguf").is_file() and listed()["tiny-Q4_K_M"]["error"] is None
    assert "tiny-Q4_K_M is in the store" in r.stdout


@pytest.mark.parametrize("args, expect", [
    (("acme/nope-GGUF",), "no such repo"),
    (("acme/tiny-mixtral-GGUF", "Q2_K"), "no Q2_K file in this repo (it has: Q4_K_M, Q8_0)"),
    (("acme/gated-GGUF",), "is gated"),
])
def test_pull_errors_are_one_line(hub, args, expect):
    r = run_cli("pull", *args, env=env(hub))
    assert one_line_error(r, expect), r.stderr


def test_offline_and_not_cached(hub):
    r = run_cli("pull", "acme/tiny-mixtral-GGUF", env={**env(hub), "HF_HUB_OFFLINE": "1"})
    assert one_line_error(r, "offline"), r.stderr


def test_repo_names_where_a_model_is_taken(hub):
    # not in the store and no terminal to ask in: one line saying how to fetch it
    r = run_cli("plan", "acme/tiny-mixtral-GGUF:Q4_K_M", "--json", env=env(hub), stdin=subprocess.DEVNULL)
    assert one_line_error(r, "localmix pull acme/tiny-mixtral-GGUF Q4_K_M"), r.stderr
    assert run_cli("pull", "acme/tiny-mixtral-GGUF", env=env(hub)).returncode == 0
    r = run_cli("plan", "acme/tiny-mixtral-GGUF:Q4_K_M", "--json", env=env(hub), stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr


def test_pull_a_safetensors_repo_quantizes_it(tiny):
    from tests.support.ggufs import metadata

    with FakeHub() as h:
        h.add("acme/tiny-mixtral", {p.name: p for p in sorted(tiny.iterdir()) if p.is_file()})
        r = run_cli("pull", "acme/tiny-mixtral", "Q4_K_M", env=env(h))
        assert r.returncode == 0, r.stderr
    stored = store() / "acme--tiny-mixtral-Q4_K_M.gguf"
    assert metadata(stored)["general.source.huggingface.repository"] == "acme/tiny-mixtral"


def test_partial_files_of_pulls_that_no_longer_run_are_removed(hub):
    partials = store() / ".partial"
    partials.mkdir(parents=True)
    old = partials / "gone-Q8_0.gguf.0123456789abcdef.partial"  # nobody resumed it for a month
    old.write_bytes(b"x" * 1000)
    month_ago = time.time() - 30 * 86400
    os.utime(old, (month_ago, month_ago))
    fresh = partials / "other-Q8_0.gguf.0123456789abcdef.partial"  # may be resumed: kept
    fresh.write_bytes(b"y" * 10)
    superseded = partials / "tiny-mixtral-Q4_K_M.gguf.ffffffffffffffff.partial"  # the hub's file changed since
    superseded.write_bytes(b"z" * 10)
    (partials / "gone-Q8_0.lock").write_text("4194311")  # the lock of a pull that was killed
    (store() / ".tiny-mixtral-Q4_K_M.gguf.4194311.link").symlink_to("nowhere")  # a link it was making
    r = run_cli("pull", "acme/tiny-mixtral-GGUF", env=env(hub))
    assert r.returncode == 0, r.stderr
    assert "removed 3 partial download file(s) left by pulls that no longer run" in r.stdout
    assert os.listdir(partials) == [fresh.name] and sorted(os.listdir(store())) == [".partial", "tiny-mixtral-Q4_K_M.gguf"]
    assert set(listed()) == {"tiny-mixtral-Q4_K_M"}
    table = run_cli("list")
    assert "1 partial download(s)" in table.stdout and "other-Q8_0" not in table.stdout
    # rm removes the model's own partial files
    (partials / "tiny-mixtral-Q4_K_M.gguf.0000000000000000.partial").write_bytes(b"z")
    r = run_cli("rm", "tiny-mixtral-Q4_K_M", "--yes")
    assert r.returncode == 0 and "removed 1 partial download file(s) of tiny-mixtral-Q4_K_M" in r.stdout, r.stdout
    assert os.listdir(partials) == [fresh.name]


def test_files_and_folders_where_pull_needs_the_other_are_one_line(hub):
    store().mkdir(parents=True)
    (store() / ".partial").write_text("a file where the folder of partial downloads goes")
    r = run_cli("pull", "acme/tiny-mixtral-GGUF", env=env(hub))
    assert one_line_error(r, "the folder of partial downloads") and "is not a folder" in r.stderr, r.stderr
    (store() / ".partial").unlink()
    (store() / "tiny-mixtral-Q4_K_M.gguf").mkdir()
    (store() / "tiny-mixtral-Q4_K_M.gguf" / "notes.txt").write_text("the user's")
    r = run_cli("pull", "acme/tiny-mixtral-GGUF", env=env(hub))
    assert one_line_error(r, "tiny-mixtral-Q4_K_M.gguf is a folder; move it out of the store"), r.stderr
    assert (store() / "tiny-mixtral-Q4_K_M.gguf" / "notes.txt").exists()
