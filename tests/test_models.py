"""The model store: listing (a split model is one model, complete only with every part) and the names
a MODEL argument accepts."""

import os
import shutil
from pathlib import Path

import pytest

from localmix.errors import LocalmixError, ModelFileError, NotInStore
from localmix.models import pulled_names, resolve_model, stored_models


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
    assert models["cut"].model is None and "truncated" in models["cut"].error
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
