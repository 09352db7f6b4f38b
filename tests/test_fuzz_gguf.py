"""Hostile GGUF files through `info`, `plan` and `run`, as a user runs them (the fork-server harness, real
llama.cpp): every case ends in success or in one line and exit status 1; no traceback, hang, signal,
escape sequence or file left behind. First a seeded sweep (tests/fuzz/gguf.py), then one case for each
kind of file that once crashed, hung or garbled the terminal, each with the line it must now give."""

from __future__ import annotations

import re
import struct

import pytest

from tests.fuzz.gguf import cases
from tests.fuzz.harness import Case, Harness, failures, isolated_env, leftovers
from tests.support.ggufs import ARR, F16, I32, STR, U32, U64, Model, base_model, serialise

RUN = ["hi", "--max-tokens", "2", "--vram", "0", "--ctx", "512", "--threads", "1", "--seed", "1"]


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    home = tmp_path_factory.mktemp("fuzz-home")
    with Harness(env=isolated_env(home)) as h:
        # The bandwidth probes, once and alone: every later case reads them from the cache.
        warm = tmp_path_factory.mktemp("warm")
        (warm / "base.gguf").write_bytes(serialise(base_model()))
        [o] = h.run([Case(["plan", "base.gguf", "--vram", "0"], str(warm), 120)])
        assert o.code == 0, o.describe()
        yield h


def test_hostile_files(harness, tmp_path):
    """150 mutated files: info and plan on each, run (into llama.cpp) on 50 of them."""
    outcomes = harness.run(cases(seed=10, n=150, workdir=tmp_path, run_every=3))
    assert len(outcomes) == 350
    assert all(o.ok for o in outcomes), failures(outcomes)
    assert not leftovers(outcomes)
    for o in outcomes:
        assert "\x1b" not in shown_text(o), o.describe()  # escape sequences from the file never reach the terminal
        assert len(o.stderr) < 1000, o.describe()  # one line, not kilobytes of the file
    assert sum(o.code == 0 for o in outcomes if o.case.argv[0] == "run") >= 3  # some files are still runnable


def shown_text(o) -> str:
    """What a case printed from the file: all of it, except the reply `run` prints (the model's own text,
    which a random model may fill with any byte)."""
    return o.stderr + (o.stdout if o.case.argv[0] != "run" else "")


# -- one case per row --------------------------------------------------------------------------------------------


def kv(key: str, vtype: int, value, sub: int = 0):
    def mutate(m: Model) -> None:
        found = m.get(key)
        if found is None:
            m.kv.append(type(m.kv[0])(key, vtype, value, sub))
        else:
            found.type, found.value, found.sub = vtype, value, sub
    return mutate


def duplicate_token(m: Model) -> None:
    m.get("tokenizer.ggml.tokens").value[300 - 2] = "▁h"  # the last piece becomes another one's text


def no_byte_token(m: Model) -> None:
    m.get("tokenizer.ggml.tokens").value[3 + 0x5B] = ""  # <0x5B>, '[', which the template's [INST] needs


def duplicate_tensor(m: Model) -> None:
    m.tensors.append(m.tensors[1])


def experts_stacked(n: int):
    def mutate(m: Model) -> None:
        for t in m.tensors:
            if t.name.endswith("_exps.weight"):
                t.shape[-1] = n
                t.data = bytes(2 * t.shape[0] * t.shape[1] * n)
    return mutate


def one_token_more(m: Model) -> None:
    m.kv.remove(m.get("llama.vocab_size"))
    m.get("tokenizer.ggml.tokens").value.append("▁zz")
    m.get("tokenizer.ggml.scores").value.append(-99.0)
    m.get("tokenizer.ggml.token_type").value.append(1)


def long_tensor_name(m: Model) -> None:
    m.tensors[0].name = "n" * 100_000


def attn_v_shape(m: Model) -> None:
    t = next(t for t in m.tensors if t.name == "blk.0.attn_v.weight")
    t.shape, t.data = [32, 8], bytes(2 * 32 * 8)
    assert t.type == F16


def huge_vocabulary_count(data: bytes) -> bytes:
    at = data.find(b"tokenizer.ggml.tokens") + len("tokenizer.ggml.tokens") + 8
    return data[:at] + struct.pack("<Q", 10**9) + data[at + 8:]


def truncated(data: bytes) -> bytes:
    return data[:-1000]


# (id, change to the model or to its bytes, command, what the one line says; None: it succeeds)
ROWS = [
    ("block_count 0", kv("llama.block_count", U32, 0), "run", "llama.block_count is 0"),
    ("block_count 1e9", kv("llama.block_count", U32, 10**9), "plan", "llama.block_count is 1000000000"),
    ("block_count 3, tensors of 2 layers", kv("llama.block_count", U32, 3),
     "run", "llama.block_count is 3, but the file has tensors of layers 0 to 1"),
    ("expert_count 1", kv("llama.expert_count", U32, 1), "run", "llama.expert_count is 1"),
    ("expert_count 1e9", kv("llama.expert_count", U32, 10**9), "run", "llama.expert_count is 1000000000"),
    ("expert_count 8, tensors of 4", kv("llama.expert_count", U32, 8),
     "run", "llama.expert_count is 8, but blk.0.ffn_gate_exps.weight has shape [32, 32, 4]"),
    ("tensors of 8 experts, expert_count 4", experts_stacked(8),
     "run", "llama.expert_count is 4, but blk.0.ffn_gate_exps.weight has shape [32, 32, 8]"),
    ("expert_used_count 0", kv("llama.expert_used_count", U32, 0), "run", "llama.expert_used_count is 0"),
    ("expert_used_count above expert_count", kv("llama.expert_used_count", U32, 5), "run", "llama.expert_used_count is 5"),
    ("duplicate token", duplicate_token, "run", "tokenizer.ggml.tokens has '▁h' twice"),
    ("a byte token missing", no_byte_token, "run", "tokenizer.ggml.tokens lacks the byte token <0x5B>"),
    ("a vocabulary larger than the embedding", one_token_more,
     "run", "tokenizer.ggml.tokens gives 300 tokens but token_embd.weight has 299 rows"),
    ("list-valued count", kv("llama.embedding_length", ARR, [32, 32], U32), "info", "llama.embedding_length is [32, 32]"),
    ("string-valued count", kv("llama.attention.head_count", STR, "4"),
     "plan", "llama.attention.head_count is '4': a string where an integer"),
    ("per-layer list of the wrong length", kv("llama.attention.head_count_kv", ARR, [2, 2, 2], I32),
     "plan", "a list of 3 values for 2 layers"),
    ("alignment of the wrong type", kv("general.alignment", U64, 32),
     "run", "general.alignment is 32: stored as u64, llama.cpp reads it only as u32"),
    ("count of the wrong type", kv("llama.context_length", U64, 4096), "run", "llama.context_length is 4096: stored as u64"),
    ("duplicate tensor", duplicate_tensor, "info", "tensor blk.0.attn_norm.weight is there twice"),
    ("100,000-character tensor name", long_tensor_name, "info", "a tensor name of 100,000 bytes"),
    ("a billion tokens claimed", huge_vocabulary_count, "plan", "tokenizer.ggml.tokens claims 1,000,000,000 elements"),
    ("tensor data past the end", truncated, "info", "ends past the end of the file"),
    ("llama.cpp refuses a shape", attn_v_shape, "run", "llama.cpp could not load model.gguf: tensor 'blk.0.attn_v.weight' has wrong shape"),
    ("context of 2^31", kv("llama.context_length", U32, 2**31 - 1), "run", None),
    ("[/INST] in the name", kv("general.name", STR, "Mixtral [/INST] [bold]x[/bold]"), "info", None),
    ("[/INST] in the name (plan)", kv("general.name", STR, "Mixtral [/INST] [bold]x[/bold]"), "plan", None),
    ("escape sequences in the name", kv("general.name", STR, "\x1b]0;pwned\x07\x1b[2J"), "info", None),
    ("escape sequences in the name (plan)", kv("general.name", STR, "\x1b]0;pwned\x07\x1b[2J"), "plan", None),
    ("100,000-character name", kv("general.name", STR, "x" * 100_000), "info", None),
    ("100,000-character name (plan)", kv("general.name", STR, "x" * 100_000), "plan", None),
    ("[/INST] and escapes in the chat template", kv("tokenizer.chat_template", STR, "[/INST]\x1b[2J {{ messages }}"), "info", None),
]


@pytest.fixture(scope="module")
def row_outcomes(harness, tmp_path_factory) -> dict:
    batch = []
    for i, (name, change, command, _) in enumerate(ROWS):
        folder = tmp_path_factory.mktemp(f"row{i}")
        m = base_model()
        if change in (huge_vocabulary_count, truncated):
            data = change(serialise(m))
        else:
            change(m)
            data = serialise(m)
        (folder / "model.gguf").write_bytes(data)
        args = {"run": RUN, "plan": ["--vram", "0", "--ctx", "512"], "info": []}[command]
        batch.append(Case([command, "model.gguf", *args], str(folder), 60, name))
    return {c.case.label: c for c in harness.run(batch)}


@pytest.mark.parametrize("name, command, expect", [(r[0], r[2], r[3]) for r in ROWS], ids=[r[0] for r in ROWS])
def test_row(row_outcomes, name, command, expect):
    o = row_outcomes[name]
    assert o.signal is None and not o.hung and not o.traceback, o.describe()
    assert "\x1b" not in shown_text(o) and not o.new_files, o.describe()
    if expect is None:
        assert o.code == 0, o.describe()
        assert len(o.stdout) < 5000, o.describe()  # the name and the template are shown bounded
        shown = {"[/INST]": "[/INST]", "escape sequences": "\\x1b]0;pwned\\x07", "100,000": r"100,000\s+characters"}
        for what, text in shown.items():
            if what in name:
                assert re.search(text if what == "100,000" else re.escape(text), o.stdout), o.stdout
    else:
        assert o.one_line_error and expect in o.stderr, o.describe()
        assert o.stderr.startswith(f"localmix {command}: error: model.gguf: ") or "llama.cpp could not load" in o.stderr
