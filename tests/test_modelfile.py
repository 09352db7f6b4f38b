"""A model on disk: single GGUF files and split ones written by gguf-py's split writer (the format
llama-gguf-split writes), read as one model and checked part by part."""

import shutil
import time
from pathlib import Path

import gguf
import numpy as np
import pytest

from localmix.errors import ModelFileError
from localmix.modelfile import model_name, open_model_file, parse_split_name, read_part, split_name
from tests.support.ggufs import base_model, serialise, split_copy
from tests.support.llm import logits


def test_split_names():
    assert split_name("Mixtral-Q4_K_M", 2, 3) == "Mixtral-Q4_K_M-00002-of-00003.gguf"
    assert parse_split_name("Mixtral-Q4_K_M-00002-of-00003.gguf") == ("Mixtral-Q4_K_M", 2, 3)
    assert parse_split_name("Mixtral-Q4_K_M.gguf") is None and parse_split_name("x-1-of-2.gguf") is None
    assert model_name(Path("/m/Mixtral-Q4_K_M-00001-of-00003.gguf")) == "Mixtral-Q4_K_M"
    assert model_name(Path("/m/tiny.gguf")) == "tiny"


def reader_table(path: Path) -> dict:
    r = gguf.GGUFReader(path)
    return {t.name: (t.data_offset, int(t.n_bytes), t.tensor_type) for t in r.tensors}


def test_single_file_agrees_with_gguf_py(tiny_gguf):
    path = tiny_gguf("Q4_K_M")
    mf = open_model_file(path)
    assert mf.parts == (path,) and mf.name == "tiny-mixtral-v3-Q4_K_M" and mf.size == path.stat().st_size
    theirs = reader_table(path)
    assert {t.name: (t.offset, t.nbytes, t.type) for t in mf.tensors} == theirs
    assert mf.kv["llama.expert_count"] == 8 and mf.kv["general.architecture"] == "llama"


def test_split_file_is_one_model(tiny_gguf, tiny_split):
    part1, part2 = tiny_split
    mf = open_model_file(part1)
    assert mf.parts == (part1, part2) and mf.path == part1 and mf.name == "tiny-mixtral-Q4_K_M"
    single = open_model_file(tiny_gguf("Q4_K_M"))
    assert [t.name for t in mf.tensors] == [t.name for t in single.tensors]
    assert {t.name: (t.shape, t.type, t.nbytes) for t in mf.tensors} == {t.name: (t.shape, t.type, t.nbytes) for t in single.tensors}
    # each tensor's offset is in its own part, as gguf-py reads that part
    for i, part in enumerate((part1, part2)):
        theirs = reader_table(part)
        ours = {t.name: (t.offset, t.nbytes, t.type) for t in mf.tensors if t.part == i}
        assert ours == theirs and ours
    # the cut is inside layer 1's experts
    where = {t.name: t.part for t in mf.tensors if t.name.startswith("blk.1.ffn_") and t.name.endswith("_exps.weight")}
    assert where == {"blk.1.ffn_down_exps.weight": 0, "blk.1.ffn_gate_exps.weight": 1, "blk.1.ffn_up_exps.weight": 1}
    assert mf.kv["llama.expert_count"] == 8  # part 1's metadata
    assert open_model_file(part2).parts == mf.parts  # naming any part opens the whole model


def test_llama_cpp_reads_the_split_as_the_whole(tiny_gguf, tiny_split):
    tokens = list(range(1, 60, 2))
    assert np.array_equal(logits(tiny_split[0], tokens), logits(tiny_gguf("Q4_K_M"), tokens))


def test_a_missing_part_is_refused(tiny_split, tmp_path):
    shutil.copy(tiny_split[0], tmp_path / tiny_split[0].name)
    with pytest.raises(ModelFileError, match=r"incomplete split model: part 2 of 2 \(tiny-mixtral-Q4_K_M-00002-of-00002.gguf\) is missing"):
        open_model_file(tmp_path / tiny_split[0].name)
    shutil.copy(tiny_split[1], tmp_path / "only-00002-of-00002.gguf")
    with pytest.raises(ModelFileError, match="part 1 of 2"):
        open_model_file(tmp_path / "only-00002-of-00002.gguf")


def test_a_foreign_part_is_refused(tiny_gguf, tiny_split, tmp_path):
    """Part 2 of another split of another model, under this model's part-2 name."""
    other = split_copy(tiny_gguf("Q8_0"), tmp_path / "other" / "q8.gguf", max_tensors=15)
    assert len(other) == 3
    shutil.copy(tiny_split[0], tmp_path / tiny_split[0].name)
    shutil.copy(other[1], tmp_path / tiny_split[1].name)
    with pytest.raises(ModelFileError, match="not part 2 of this model"):
        open_model_file(tmp_path / tiny_split[0].name)
    # same count of parts, but the tensors do not add up
    two = split_copy(tiny_gguf("Q8_0"), tmp_path / "two" / "q8.gguf", first_part_tensors=30)
    shutil.copy(two[1], tmp_path / tiny_split[1].name)
    with pytest.raises(ModelFileError, match="not part 2 of this model|belongs to another model"):
        open_model_file(tmp_path / tiny_split[0].name)


def test_a_renamed_part_1_cannot_find_the_others(tiny_split, tmp_path):
    renamed = tmp_path / "renamed.gguf"
    shutil.copy(tiny_split[0], renamed)
    with pytest.raises(ModelFileError, match="NAME-00001-of-00002.gguf"):
        open_model_file(renamed)


@pytest.mark.parametrize("damage, expect", [
    (lambda b: b"GGUF" + (9).to_bytes(4, "little") + b[8:], "unsupported GGUF version 9"),
    (lambda b: b[:8] + (2**40).to_bytes(8, "little") + b[16:], "corrupt GGUF header"),
    (lambda b: b[:200], "truncated or corrupt GGUF header"),
    (lambda b: b"GGML" + b[4:], "not a GGUF file"),
    (lambda b: b[: len(b) - 1000], "ends past the end of the file"),
])
def test_damaged_files(tmp_path, tiny_gguf, damage, expect):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(damage(tiny_gguf("Q4_K_M").read_bytes()))
    with pytest.raises(ModelFileError, match=expect):
        read_part(bad)
    with pytest.raises(ModelFileError, match=f"^{bad}: "):
        open_model_file(bad)


def test_missing_file(tmp_path):
    with pytest.raises(ModelFileError, match="no such model file"):
        open_model_file(tmp_path / "nope.gguf")


def hand_written(tmp_path, m=None, damage=lambda b: b) -> Path:
    path = tmp_path / "m.gguf"
    path.write_bytes(damage(serialise(m or base_model())))
    return path


def at_key(data: bytes, key: bytes, skip: int) -> int:
    """Where the count of `key`'s array (skip=8: value and element type) or its value starts."""
    return data.find(key) + len(key) + skip


@pytest.mark.parametrize("damage, expect", [
    # counts and lengths against the bytes left, before any loop or allocation
    (lambda b: b[:8] + (2**20).to_bytes(8, "little") + b[16:], "cannot fit in"),
    (lambda b: b[:24] + (2**40).to_bytes(8, "little") + b[32:], "a key of 1,099,511,627,776 bytes"),
    (lambda b: b[: at_key(b, b"tokenizer.ggml.tokens", 8)] + (10**9).to_bytes(8, "little") + b[at_key(b, b"tokenizer.ggml.tokens", 16):],
     "tokenizer.ggml.tokens claims 1,000,000,000 elements, more than the file can hold"),
    (lambda b: b[: at_key(b, b"tokenizer.ggml.scores", 8)] + (2**61).to_bytes(8, "little") + b[at_key(b, b"tokenizer.ggml.scores", 16):],
     "tokenizer.ggml.scores claims"),
])
def test_counts_are_checked_before_they_are_used(tmp_path, damage, expect):
    path = hand_written(tmp_path, damage=damage)
    t0 = time.perf_counter()
    with pytest.raises(ModelFileError, match=expect):
        open_model_file(path)
    assert time.perf_counter() - t0 < 1.0


def tensor(m, name):
    return next(t for t in m.tensors if t.name == name)


def test_the_tensor_table_is_held_to_what_llama_cpp_reads(tmp_path):
    """As ggml's gguf reader checks it: unique names, names within GGML_MAX_NAME, whole blocks per row,
    each tensor's data where the previous one's ends, an alignment it can map."""
    m = base_model()
    m.tensors.append(m.tensors[3])
    with pytest.raises(ModelFileError, match="tensor blk.0.attn_k.weight is there twice"):
        open_model_file(hand_written(tmp_path, m))
    m = base_model()
    m.tensors[0].name = "n" * 100_000
    with pytest.raises(ModelFileError, match="a tensor name of 100,000 bytes"):
        open_model_file(hand_written(tmp_path, m))
    m = base_model()
    tensor(m, "blk.0.attn_q.weight").offset = 0
    with pytest.raises(ModelFileError, match="tensor blk.0.attn_q.weight's data is at offset 0, where the tensors before it end at"):
        open_model_file(hand_written(tmp_path, m))
    m = base_model()
    tensor(m, "blk.0.attn_q.weight").type = 12  # Q4_K: 256-element blocks, rows of 32
    with pytest.raises(ModelFileError, match=r"tensor blk.0.attn_q.weight has shape \[32, 32\], impossible for type Q4_K"):
        open_model_file(hand_written(tmp_path, m))
    m = base_model()
    m.kv.append(type(m.kv[0])("general.alignment", 4, 1))
    with pytest.raises(ModelFileError, match="general.alignment is 1: not a power of two from 32"):
        open_model_file(hand_written(tmp_path, m))
