"""Hostile GGUF files: seeded mutations of a small but real Mixtral-shaped model, as cases for `info`, `plan`
and `run`.

The base model (tests/support/ggufs.py: 2 layers, hidden 32, 4 experts of which 2 are used, a 300-token
SentencePiece vocabulary with byte fallback, a Mistral-style chat template) is one llama.cpp loads and
generates from in milliseconds, and each mutated copy is about 100 KB. It is kept as a structure
(metadata as typed values, tensors with their shapes, types and bytes) so that mutations can break any
part of the header on purpose; `serialise` writes it byte for byte as the GGUF spec lays it out, with
whatever the mutation left in it. A few mutations work on the bytes instead (truncation, flipped bytes,
huge counts and lengths).

    for case in cases(seed=1, n=100, workdir=tmp):  # 100 files: info and plan on each, run on some
        ...

`cases` is deterministic for a seed; the label of each case says what was mutated.
"""

from __future__ import annotations

import copy
import random
import struct
from pathlib import Path

from tests.fuzz.harness import Case
from tests.support.ggufs import (
    ARR,
    BOOL,
    F16,
    F32,
    F32_T,
    F64,
    I32,
    I64,
    KV,
    N_LAYER,
    STR,
    TEMPLATE,
    U32,
    U64,
    Model,
    TensorInfo,
    base_model,
    serialise,
)

# -- mutations ------------------------------------------------------------------------------------------------

ARCH_KEYS = ["block_count", "context_length", "embedding_length", "feed_forward_length", "attention.head_count",
             "attention.head_count_kv", "expert_count", "expert_used_count", "rope.dimension_count", "vocab_size",
             "attention.key_length", "attention.value_length", "rope.freq_base", "attention.layer_norm_rms_epsilon"]
OTHER_KEYS = ["general.file_type", "general.alignment", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
              "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.add_bos_token", "split.count", "split.no",
              "split.tensors.count", "general.quantization_version"]
NUMBERS = [0, 1, -1, 2, 3, 7, 1000, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**63, 2**64 - 1, 10**9]
FLOATS = [0.0, -1.0, 0.5, 1e30, float("nan"), float("inf"), -float("inf")]
HOSTILE_TEXT = [
    "\x1b]0;pwned\x07\x1b[2J\x1b[H", "[/INST]", "[bold red]x[/] [link=file:///etc/passwd]y[/link]", "[/]", "a\nb\rc\x00d",
    "\u202eevil\u200b", "x" * 100_000, b"\xff\xfe\xc0\x80 not utf-8", "", "{{ 7 * 7 }}", "%s%n%x", "\\x1b[31m",
]
HOSTILE_ARCH = ["", "qwen2moe", "[/INST]", "\x1b[2J", "x" * 100_000, "llama\x00", "deepseek2", "gpt2", "../../etc"]


def _arch(m: Model) -> str:
    a = m.get("general.architecture")
    return a.value if a and isinstance(a.value, str) else "llama"


def _set(m: Model, key: str, vtype: int, value, sub: int = 0) -> None:
    kv = m.get(key)
    if kv is None:
        m.kv.append(KV(key, vtype, value, sub))
    else:
        kv.type, kv.value, kv.sub = vtype, value, sub


def _some_key(r: random.Random, m: Model) -> str:
    keys = [f"{_arch(m)}.{k}" for k in ARCH_KEYS] * 3 + OTHER_KEYS
    return r.choice(keys)


def mut_number(r: random.Random, m: Model) -> str:
    key, v = _some_key(r, m), r.choice(NUMBERS)
    vtype = r.choice([U32, I32, U64, I64]) if v >= 0 else r.choice([I32, I64])
    _set(m, key, vtype, v)
    return f"{key}={v} ({vtype})"


def mut_float(r: random.Random, m: Model) -> str:
    key, v = _some_key(r, m), r.choice(FLOATS)
    _set(m, key, r.choice([F32, F64]), v)
    return f"{key}={v}"


def mut_wrong_type(r: random.Random, m: Model) -> str:
    key = _some_key(r, m)
    choice = r.randrange(5)
    if choice == 0:
        _set(m, key, STR, r.choice(["8", "eight", "", "[/INST]", "\x1b[2J"]))
    elif choice == 1:
        _set(m, key, ARR, [r.choice(NUMBERS[:8]) for _ in range(r.randrange(0, 5))], r.choice([U32, I32]))
    elif choice == 2:
        _set(m, key, ARR, ["a", "b"], STR)
    elif choice == 3:
        _set(m, key, BOOL, r.choice([True, False]))
    else:
        _set(m, key, ARR, [], U32)
    return f"{key} {('string', 'int list', 'string list', 'bool', 'empty list')[choice]}"


def mut_delete_key(r: random.Random, m: Model) -> str:
    kv = r.choice(m.kv)
    m.kv.remove(kv)
    return f"no {kv.key}"


def mut_text(r: random.Random, m: Model) -> str:
    key = r.choice(["general.name", "general.name", "tokenizer.chat_template", "general.source.huggingface.repository",
                    "tokenizer.ggml.model", "general.quantized_by", "general.basename"])
    text = r.choice(HOSTILE_TEXT)
    if key == "tokenizer.chat_template" and isinstance(text, str) and r.random() < 0.5:
        text = TEMPLATE + text
    _set(m, key, STR, text)
    return f"{key}={text[:30]!r}"


def mut_arch(r: random.Random, m: Model) -> str:
    a = r.choice(HOSTILE_ARCH)
    if r.random() < 0.5:  # rename the keys too, so that they are found under the new name
        for kv in m.kv:
            if isinstance(kv.key, str) and kv.key.startswith("llama."):
                kv.key = a + kv.key[len("llama"):]
    _set(m, "general.architecture", STR, a)
    return f"architecture={a[:30]!r}"


def mut_key_name(r: random.Random, m: Model) -> str:
    kv = r.choice(m.kv)
    choice = r.randrange(4)
    if choice == 0:
        m.kv.append(copy.deepcopy(kv))
        return f"duplicate key {kv.key}"
    old = kv.key
    kv.key = ["k" * 100_000, "", b"\xff\xfe", "\x1b[2J" + str(old)][choice]
    return f"key {old} renamed"


def _tokens(m: Model) -> KV | None:
    kv = m.get("tokenizer.ggml.tokens")
    return kv if kv and kv.type == ARR and kv.sub == STR and isinstance(kv.value, list) else None


def mut_vocab(r: random.Random, m: Model) -> str:
    kv = _tokens(m)
    if kv is None:
        return "no vocabulary to mutate"
    toks = kv.value
    choice = r.randrange(9)
    if choice == 7:
        types = m.get("tokenizer.ggml.token_type")
        if types is not None:
            types.value = [r.choice([0, 1, 2, 3, 4, 5, 6, 7, 99, -1]) for _ in types.value]
        return "random token types"
    if choice == 8:
        toks[r.randrange(len(toks))] = ""
        return "an empty token"
    if choice == 0:
        i, j = r.sample(range(len(toks)), 2)
        toks[i] = toks[j]
        return f"duplicate token {toks[j]!r}"
    if choice == 1:
        toks.pop()
        return "one token fewer than the embedding"
    if choice == 2:
        toks.append("▁extra")
        return "one token more than the embedding"
    if choice == 3:
        kv.value = []
        return "empty vocabulary"
    if choice == 4:
        kv.sub, kv.value = I32, list(range(len(toks)))
        return "tokens are numbers"
    if choice == 5:
        toks[r.randrange(len(toks))] = r.choice(HOSTILE_TEXT)
        return "hostile token text"
    side = r.choice(["tokenizer.ggml.scores", "tokenizer.ggml.token_type"])
    other = m.get(side)
    if other is not None:
        other.value = other.value[: r.randrange(len(other.value))]
    return f"{side} shorter than the vocabulary"


def _tensor(r: random.Random, m: Model, kind: str = "") -> TensorInfo | None:
    ts = [t for t in m.tensors if kind in str(t.name)]
    return r.choice(ts) if ts else None


def _fit_data(t: TensorInfo) -> None:
    """The tensor's data resized to its (new) shape, so that only the header's meaning is wrong, not its
    layout (when the shape is small enough to hold)."""
    n = 1
    for d in t.shape:
        n *= d
    if 0 < n <= 1 << 20 and t.type in (F16, F32_T):
        t.data = bytes(n * (2 if t.type == F16 else 4))


def mut_tensor_shape(r: random.Random, m: Model) -> str:
    t = _tensor(r, m, r.choice(["", "_exps", "token_embd", "attn_q", "ffn_gate_inp"]))
    if t is None:
        return "no tensor"
    choice = r.randrange(6)
    if choice == 0 and t.shape:
        i = r.randrange(len(t.shape))
        t.shape[i] = r.choice([0, 1, 3, 2 * t.shape[i], t.shape[i] + 1, 2**40, 2**63, 2**64 - 1])
    elif choice == 1:
        t.shape = t.shape + [1] * r.randrange(1, 4)
    elif choice == 2:
        t.shape = t.shape[:-1]
    elif choice == 3:
        t.shape = list(reversed(t.shape))
    elif choice == 4:
        t.shape = []
    else:
        t.shape = [2**32, 2**32]
    if r.random() < 0.7:
        _fit_data(t)
    return f"{t.name} shape {t.shape}"


def mut_expert_shape(r: random.Random, m: Model) -> str:
    """The stacked expert tensors of every layer disagree with expert_count the same way."""
    n = r.choice([1, 2, 3, 8])
    for t in m.tensors:
        if str(t.name).endswith("_exps.weight"):
            t.shape[-1] = n
            _fit_data(t)
    return f"expert tensors stack {n} experts"


def mut_tensor_type(r: random.Random, m: Model) -> str:
    t = _tensor(r, m)
    t.type = r.choice([2, 8, 12, 14, 4, 5, 31, 39, 99, 2**31, 0, 1])
    return f"{t.name} type {t.type}"


def mut_tensor_offset(r: random.Random, m: Model) -> str:
    t = _tensor(r, m)
    t.offset = r.choice([0, 1, 31, 2**40, 2**64 - 32, 2**63, len(t.data)])
    return f"{t.name} offset {t.offset}"


def mut_tensor_name(r: random.Random, m: Model) -> str:
    t = _tensor(r, m)
    choice = r.randrange(5)
    if choice == 0:
        dup = copy.deepcopy(t)
        m.tensors.append(dup)
        return f"duplicate tensor {t.name}"
    old = t.name
    t.name = ["blk.99.attn_q.weight", "blk.-1.attn_q.weight", "n" * 100_000, "blk." + "9" * 40 + ".ffn_up_exps.weight"][choice - 1]
    return f"tensor {old} renamed {str(t.name)[:40]}"


def mut_drop_tensor(r: random.Random, m: Model) -> str:
    choice = r.randrange(3)
    if choice == 0:
        t = _tensor(r, m)
        m.tensors.remove(t)
        return f"no {t.name}"
    if choice == 1:
        m.tensors = [t for t in m.tensors if not str(t.name).startswith("blk.1.")]
        return "no layer 1 tensors"
    m.tensors = [t for t in m.tensors if not str(t.name).endswith("_exps.weight")]
    return "no expert tensors"


def mut_consistent_layers(r: random.Random, m: Model) -> str:
    """block_count changed, tensors left: llama.cpp aborts on some counts that the header alone allows."""
    n = r.choice([0, 1, 3, 10**9, 2**32 - 1])
    _set(m, f"{_arch(m)}.block_count", U32, n)
    return f"block_count={n}"


def mut_experts(r: random.Random, m: Model) -> str:
    """The counts llama.cpp asserts on: expert_count 1 or huge, expert_used_count 0 or above the count."""
    a = _arch(m)
    choice = r.randrange(6)
    key, v = [(f"{a}.expert_count", 1), (f"{a}.expert_count", 10**9), (f"{a}.expert_used_count", 0),
              (f"{a}.expert_used_count", 5), (f"{a}.expert_count", 0), (f"{a}.expert_used_count", 4)][choice]
    _set(m, key, U32, v)
    return f"{key}={v}"


def mut_per_layer(r: random.Random, m: Model) -> str:
    """A per-layer list where llama.cpp takes one (right or wrong length, right or wrong values)."""
    key = f"{_arch(m)}.{r.choice(['attention.head_count', 'attention.head_count_kv', 'feed_forward_length'])}"
    kv = m.get(key)
    v = kv.value if kv is not None and isinstance(kv.value, int) else 2
    values = r.choice([[v] * N_LAYER, [v] * (N_LAYER + 1), [v, 0], [v, 2 * v], [0] * N_LAYER, [v]])
    _set(m, key, ARR, values, r.choice([I32, U32, U32, F32]))
    return f"{key}={values}"


def mut_heads(r: random.Random, m: Model) -> str:
    """Head counts and sizes that still multiply out to the tensors' shapes, or nearly."""
    a = _arch(m)
    key, v = r.choice([(f"{a}.attention.head_count", 8), (f"{a}.attention.head_count", 2), (f"{a}.attention.head_count_kv", 4),
                       (f"{a}.attention.head_count_kv", 1), (f"{a}.attention.key_length", 16), (f"{a}.attention.key_length", 4),
                       (f"{a}.attention.value_length", 16), (f"{a}.rope.dimension_count", 16), (f"{a}.rope.dimension_count", 7),
                       (f"{a}.feed_forward_length", 64), (f"{a}.tokenizer.ggml.bos_token_id", 10**6)])
    _set(m, key, U32, v)
    return f"{key}={v}"


def mut_version(r: random.Random, m: Model) -> str:
    m.version = r.choice([1, 2, 4, 2**32 - 1])
    return f"version {m.version}"


MUTATIONS = [
    (mut_number, 8), (mut_float, 2), (mut_wrong_type, 5), (mut_delete_key, 3), (mut_text, 5), (mut_arch, 2),
    (mut_key_name, 2), (mut_vocab, 4), (mut_tensor_shape, 4), (mut_expert_shape, 2), (mut_tensor_type, 2),
    (mut_tensor_offset, 2), (mut_tensor_name, 3), (mut_drop_tensor, 2), (mut_consistent_layers, 2), (mut_experts, 3),
    (mut_version, 1), (mut_per_layer, 2), (mut_heads, 3),
]


# -- byte-level damage ------------------------------------------------------------------------------------------


def _header_end(m: Model) -> int:
    return len(serialise(Model(m.kv, [], m.version))) - 8  # roughly where the tensor table starts


def raw_damage(r: random.Random, data: bytes, m: Model) -> tuple[bytes, str]:
    choice = r.randrange(6)
    b = bytearray(data)
    if choice == 0:
        at = r.choice([0, 3, 8, 16, 24, r.randrange(len(b)), r.randrange(_header_end(m)), len(b) - 1])
        return bytes(b[:at]), f"truncated at {at}"
    if choice == 1:
        which = r.choice([8, 16])  # n_tensors or n_kv
        b[which:which + 8] = struct.pack("<Q", r.choice([2**20, 2**20 + 1, 10**9, 2**63, 2**64 - 1]))
        return bytes(b), f"count at {which} huge"
    if choice == 2:  # the length of the first key, or of a string value, made huge
        b[24:32] = struct.pack("<Q", r.choice([2**31, 2**40, 2**63, len(b) - 20]))
        return bytes(b), "first key length huge"
    if choice == 3:  # the count of the vocabulary array
        needle = b"tokenizer.ggml.tokens"
        at = b.find(needle)
        if at >= 0:
            at += len(needle) + 4 + 4  # value type, element type
            b[at:at + 8] = struct.pack("<Q", r.choice([10**9, 2**40, 2**63, 0]))
        return bytes(b), "vocabulary count huge"
    if choice == 4:
        end = _header_end(m) + 200 * len(m.tensors)
        for _ in range(r.randrange(1, 8)):
            i = r.randrange(24, min(len(b), end))
            b[i] = r.randrange(256)
        return bytes(b), "bytes flipped in the header"
    return bytes(b[: len(b) - r.randrange(1, 4096)]), "truncated data"


# -- cases --------------------------------------------------------------------------------------------------------


# What llama.cpp itself reads and may abort on, for the files `run` is given: no byte-level damage, which
# localmix's reader already refuses.
SEMANTIC = {mut_number, mut_wrong_type, mut_delete_key, mut_vocab, mut_expert_shape, mut_consistent_layers, mut_experts,
            mut_tensor_shape, mut_tensor_name, mut_drop_tensor, mut_text, mut_float, mut_per_layer, mut_heads}


def mutate(r: random.Random, base: Model, semantic: bool = False) -> tuple[bytes, str]:
    """One hostile file's bytes and what was done to it. `semantic`: header values and tensor tables only,
    every length right (what gets past a reader and reaches llama.cpp)."""
    m = copy.deepcopy(base)
    labels = []
    fns, weights = zip(*[(f, w) for f, w in MUTATIONS if f in SEMANTIC or not semantic], strict=True)
    for _ in range(r.choice([1, 1, 1, 2, 3])):
        labels.append(r.choices(fns, weights)[0](r, m))
    data = serialise(m)
    if not semantic and r.random() < 0.12:
        data, label = raw_damage(r, data, m)
        labels.append(label)
    return data, "; ".join(labels)


def _file_name(r: random.Random) -> str:
    x = r.random()
    return "m-00001-of-00002.gguf" if x < 0.06 else "m-00002-of-00002.gguf" if x < 0.08 else "model.gguf"


def files(seed: int, n: int, workdir: Path, run_every: int = 0) -> list[tuple[Path, str]]:
    """`n` hostile files, each in its own folder under `workdir`: (path, label). The first is the base
    model itself, unharmed; every `run_every`-th one has only semantic mutations. File i depends only on
    (seed, i)."""
    base = base_model()
    out = []
    for i in range(n):
        r = random.Random(f"{seed}/{i}")  # one stream per file: a change to one mutation leaves the other files alone
        folder = workdir / f"g{seed}-{i:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        if i == 0:
            data, label = serialise(base), "base"
        else:
            data, label = mutate(r, base, semantic=bool(run_every) and i % run_every == 0)
        path = folder / ("model.gguf" if i == 0 else _file_name(r))
        path.write_bytes(data)
        out.append((path, label))
    return out


PLAN_FLAGS = [["--vram", "0"], ["--vram", "0", "--json"], ["--vram", "24G", "--ram", "1000G"], ["--vram", "2G", "--llama-args"]]


def cases(seed: int, n: int, workdir: Path, *, run_every: int = 6, timeout: float = 30.0) -> list[Case]:
    """`n` hostile files under `workdir`, with an `info` and a `plan` case for each (`plan` with budgets
    given, so no GPU is needed) and, for every `run_every`-th one (0: none; their mutations are semantic
    only), a `run FILE hi --max-tokens 2` case on the CPU."""
    out = []
    for i, (path, label) in enumerate(files(seed, n, workdir, run_every)):
        cwd, name = str(path.parent), path.name
        out.append(Case(["info", name] + (["--json"] if i % 4 == 1 else []), cwd, timeout, label))
        out.append(Case(["plan", name, "--ctx", "512", *PLAN_FLAGS[i % len(PLAN_FLAGS)]], cwd, timeout, label))
        if run_every and i % run_every == 0:
            out.append(Case(["run", name, "hi", "--max-tokens", "2", "--vram", "0", "--ctx", "512", "--threads", "1",
                             "--seed", "1"], cwd, timeout * 2, label))
    return out


def main(argv: list[str] | None = None) -> int:
    """`python -m tests.fuzz.gguf [--seed S] [--n N] [--run-every K]`: a sweep, with totals per kind of failure."""
    import argparse
    import collections
    import os
    import tempfile
    import time

    from tests.fuzz.harness import Harness, isolated_env, leftovers

    p = argparse.ArgumentParser(prog="python -m tests.fuzz.gguf")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--n", type=int, default=1000, help="hostile files (each gets info and plan; some get run)")
    p.add_argument("--run-every", type=int, default=20)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--show", type=int, default=40, help="failures to print")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="fuzz-gguf-") as tmp:
        home = Path(tmp) / "home"
        env = isolated_env(home)
        os.environ.update(env)
        from localmix.hardware import detect

        detect()  # the bandwidth probes, once, before the cases (each would probe otherwise)
        all_cases = cases(args.seed, args.n, Path(tmp) / "cases", run_every=args.run_every)
        t0 = time.monotonic()
        with Harness(env=env, workers=args.workers) as h:
            outcomes = h.run(all_cases)
        seconds = time.monotonic() - t0
    kinds: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for o in outcomes:
        command = o.case.argv[0]
        kinds[command][o.kind] += 1
        if o.ok and o.code == 1 and len(o.stderr) > 400:
            kinds[command]["long message"] += 1
        if "\x1b" in o.stderr + (o.stdout if command != "run" else ""):  # run's stdout is the model's reply
            kinds[command]["escape reached the terminal"] += 1
    left = leftovers(outcomes)
    print(f"{args.n} files, {len(outcomes)} cases, {seconds:.0f} s, {len(left)} files left behind")
    for command, counter in kinds.items():
        print(f"  {command}: {sum(v for k, v in counter.items() if k in ('ok', 'hang', 'signal', 'traceback', 'not one line'))} "
              f"cases: " + ", ".join(f"{k} {v}" for k, v in sorted(counter.items())))
    bad = [o for o in outcomes if not o.ok]
    for o in bad[: args.show]:
        print(" ", o.describe())
    return 1 if bad or left else 0


if __name__ == "__main__":
    raise SystemExit(main())
