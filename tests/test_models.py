"""The model store: listing (a split model is one model, complete only with every part) and the names
a MODEL argument accepts."""

import os
import re
import shutil
from pathlib import Path

import pytest

from localmix.errors import LocalmixError, ModelFileError, NotInStore
from localmix.models import pulled_names, resolve_model, stored, stored_models


@pytest.fixture
def store(tiny_gguf, tiny_split):
    folder = Path(os.environ["LOCALMIX_HOME"]) / "models"
    folder.mkdir(parents=True)
    shutil.copy(tiny_gguf("Q4_K_M"), folder / "tiny-Q4_K_M.gguf")
    for p in tiny_split:
        os.symlink(p, folder / p.name.replace("tiny-mixtral", "split"))  # as pull links the HF cache
    shutil.copy(tiny_split[0], folder / "tiny-half-00001-of-00002.gguf")  # part 2 never arrived
    (folder / "cut.gguf").write_bytes(tiny_gguf("Q4_K_M").read_bytes()[:100_000])
    return folder


def test_listing(store):
    models = {m.name: m for m in stored_models()}
    assert set(models) == {"tiny-Q4_K_M", "split-Q4_K_M", "tiny-half", "cut"}
    split = models["split-Q4_K_M"]
    assert split.model is not None and len(split.files) == 2 and split.path.name == "split-Q4_K_M-00001-of-00002.gguf"
    assert split.size == sum(p.stat().st_size for p in split.files)
    assert models["tiny-half"].model is None and "part 2 of 2" in models["tiny-half"].error
    assert models["cut"].model is None and re.search("truncated|more than the file", models["cut"].error)
    assert models["tiny-Q4_K_M"].model is not None and models["tiny-Q4_K_M"].error is None


def test_names(store, tmp_path):
    assert resolve_model("tiny-Q4_K_M") == store / "tiny-Q4_K_M.gguf"
    assert resolve_model("TINY-q4_k_m") == store / "tiny-Q4_K_M.gguf"
    assert resolve_model("spl") == store / "split-Q4_K_M-00001-of-00002.gguf"  # a unique prefix
    elsewhere = tmp_path / "x.gguf"
    assert resolve_model(str(elsewhere)) == elsewhere  # a path, even a missing one: its opener reports it
    with pytest.raises(LocalmixError, match="matches several models"):
        resolve_model("tiny")
    with pytest.raises(ModelFileError, match="tiny-half: .*part 2 of 2"):
        resolve_model("tiny-half")
    with pytest.raises(LocalmixError, match="no model 'nothing'.*in the store: cut, split-Q4_K_M, tiny-half"):
        resolve_model("nothing")


def test_hub_names(store):
    with pytest.raises(NotInStore) as e:
        resolve_model("acme/tiny-GGUF:Q8_0")
    assert (e.value.repo, e.value.quant) == ("acme/tiny-GGUF", "Q8_0")
    assert "localmix pull acme/tiny-GGUF Q8_0" in str(e.value)
    assert resolve_model("acme/tiny-GGUF") == store / "tiny-Q4_K_M.gguf"  # Q4_K_M by default, as pull named it
    assert resolve_model("acme/split-GGUF:q4_k_m") == store / "split-Q4_K_M-00001-of-00002.gguf"


def test_pulled_names_never_hold_a_folder():
    assert pulled_names("acme/Mixtral-GGUF", "q4_k_m")[0] == "Mixtral-Q4_K_M"
    assert pulled_names("acme/Mixtral-GGUF", "sub/dir/Mixtral-IQ3_M.gguf") == ("Mixtral-IQ3_M",)
    assert pulled_names("acme/M-GGUF", "Q8_0/M-Q8_0-00001-of-00002.gguf") == ("M-Q8_0",)


def _models() -> Path:
    folder = Path(os.environ["LOCALMIX_HOME"]) / "models"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def test_an_exact_name_wins_and_a_name_matching_several_is_refused(tiny_gguf):
    folder = _models()
    for name in ("Mixtral-Q4_K_M", "mixtral-q4_k_m", "tiny", "tiny-2"):
        os.link(tiny_gguf("Q4_K_M"), folder / f"{name}.gguf")
    assert resolve_model("Mixtral-Q4_K_M") == folder / "Mixtral-Q4_K_M.gguf"
    assert resolve_model("mixtral-q4_k_m") == folder / "mixtral-q4_k_m.gguf"
    assert resolve_model("mixtral-q4_k_m.gguf") == folder / "mixtral-q4_k_m.gguf"  # a store file name
    with pytest.raises(LocalmixError, match="'mixtral-Q4_K_M' matches several models only by case: Mixtral-Q4_K_M, mixtral-q4_k_m"):
        resolve_model("mixtral-Q4_K_M")
    with pytest.raises(LocalmixError, match="'MIX' matches several models as a prefix"):
        resolve_model("MIX")
    assert resolve_model("tiny") == folder / "tiny.gguf"  # a whole name, though also a prefix of tiny-2
    assert resolve_model("TINY") == folder / "tiny.gguf"  # the only whole name of any case
    assert resolve_model("tiny-") == folder / "tiny-2.gguf"
    with pytest.raises(LocalmixError, match="no model ''"):
        resolve_model("")  # not a prefix of everything
    assert stored("Mixtral-Q4_K_M").files == [folder / "Mixtral-Q4_K_M.gguf"]
    with pytest.raises(LocalmixError, match="only by case"):
        stored("MIXTRAL-Q4_K_M")
    with pytest.raises(LocalmixError, match="no model 'tiny-'"):
        stored("tiny-")  # what rm removes is named whole, never by a prefix
    with pytest.raises(LocalmixError, match="no model 'x{20}.*5,000 characters"):
        resolve_model("x" * 5000)  # too long for a file name: not a crash


def test_two_models_of_one_name_are_told_apart_by_file_name(tiny_gguf, tiny_split):
    folder = _models()
    os.link(tiny_gguf("Q4_K_M"), folder / "m.gguf")
    for p in tiny_split:
        os.link(p, folder / p.name.replace("tiny-mixtral-Q4_K_M", "m"))
    with pytest.raises(LocalmixError, match="matches several models exactly: m-00001-of-00002.gguf, m.gguf; name one by its file name"):
        resolve_model("m")
    assert resolve_model("m-00002-of-00002.gguf") == folder / "m-00001-of-00002.gguf"  # a part names the model


def test_what_is_not_a_gguf_file_is_a_broken_entry(tiny_gguf, tmp_path):
    folder = _models()
    blob = Path(os.environ["HF_HOME"]) / "hub" / "models--acme--x" / "blobs" / "abc"
    blob.parent.mkdir(parents=True)
    shutil.copy(tiny_gguf("Q4_K_M"), blob)
    os.symlink(blob, folder / "linked.gguf")
    assert resolve_model("linked") == folder / "linked.gguf"
    shutil.rmtree(blob.parents[1])  # the Hugging Face cache entry is deleted
    os.symlink("loop-b.gguf", folder / "loop-a.gguf")
    os.symlink("loop-a.gguf", folder / "loop-b.gguf")
    (folder / "folder.gguf").mkdir()
    os.mkfifo(folder / "pipe.gguf")
    os.symlink(tmp_path, folder / "dirlink.gguf")
    (folder / ".hidden.gguf").write_bytes(b"not listed")
    (folder / "evil\x1b]0;t\x07[red].gguf").write_bytes(b"GGUF")
    models = {m.name: m for m in stored_models()}
    assert set(models) == {"linked", "loop-a", "loop-b", "folder", "pipe", "dirlink", "evil\x1b]0;t\x07[red]"}
    assert models["linked"].error == f"a link to a missing file ({blob})"
    assert models["loop-a"].error == "a link loop" and models["folder"].error == "a folder, not a GGUF file"
    assert models["pipe"].error == "not a regular file" and models["dirlink"].error == "a folder, not a GGUF file"
    assert all(m.model is None for m in models.values()) and models["linked"].size == models["folder"].size == 0
    with pytest.raises(ModelFileError, match=r"^linked: a link to a missing file"):
        resolve_model("linked")
    with pytest.raises(ModelFileError, match=r"^pipe: not a regular file$"):
        resolve_model("pipe")  # never opened: a pipe would block the reader
    with pytest.raises(ModelFileError) as e:
        resolve_model("evil")
    assert str(e.value).startswith("evil\\x1b]0;t\\x07[red]: ")  # escaped, one line
