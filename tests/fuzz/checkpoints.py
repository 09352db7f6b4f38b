"""Seeded mutations of a small Hugging Face checkpoint (the tiny Mixtral of tests/support/checkpoints.py),
each one a `localmix quantize ckpt -o out.gguf` case for the harness.

What is mutated: config.json values (zero, negative, huge, wrong type, missing, null, list, a plausible
number that contradicts the tensors), JSON files truncated or garbage, safetensors headers (length,
JSON, dtypes, shapes, offsets), tensors added or removed, NaN and infinities in the weights, tokenizer
files, flags and output paths. Some cases are valid on purpose (a consistent change, no change at all),
so a run sees successes too.

Every case gets its own folder `NNNN/` with `ckpt/` inside: the base checkpoint's files hard-linked (a
mutated file is unlinked and written anew, never changed in place, so the base stays intact).

    from tests.fuzz.checkpoints import cases
    outcomes = harness.run(cases(seed=1, n=200, workdir=tmp))
"""

from __future__ import annotations

import json
import random
import struct
from collections.abc import Callable
from pathlib import Path

from tests.fuzz.harness import Case
from tests.support.checkpoints import linked_copy, put, read_shard, write_shard

INDEX = "model.safetensors.index.json"
OUT = "out.gguf"

# Values that do not belong in a config.json field; `DROP` removes the key.
DROP = object()
HOSTILE = [0, -1, 1, 3, 2**31, 2**63, 10**30, 1e308, -1e308, 0.5, "abc", "4", True, False, None, [], [4], {}, {"a": 1},
           float("nan"), float("inf"), DROP]
INT_KEYS = ["num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
            "head_dim", "num_local_experts", "num_experts_per_tok", "vocab_size", "max_position_embeddings",
            "bos_token_id", "eos_token_id", "pad_token_id"]
FLOAT_KEYS = ["rope_theta", "rms_norm_eps"]
OTHER_KEYS = ["architectures", "rope_parameters", "rope_scaling", "tie_word_embeddings", "text_config"]


# ---- files ------------------------------------------------------------------------------------------


def _get_json(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


def _put_json(path: Path, obj) -> None:
    put(path, json.dumps(obj, indent=1))


def _shards(ck: Path) -> list[Path]:
    return sorted(ck.glob("model*.safetensors"))


def _tensor_shard(ck: Path, name: str) -> Path:
    return ck / _get_json(ck / INDEX)["weight_map"][name]


def _tensor_names(ck: Path) -> list[str]:
    return sorted(_get_json(ck / INDEX)["weight_map"])


def _add_tensors(ck: Path, tensors: dict[str, tuple[str, list[int], bytes]], shard: str = "model-extra.safetensors") -> None:
    """New tensors (dtype, shape, bytes) in a new shard, named in the index."""
    header, data = {}, b""
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    write_shard(ck / shard, header, data)
    index = _get_json(ck / INDEX)
    index["weight_map"].update({name: shard for name in tensors})
    _put_json(ck / INDEX, index)


def _remove_tensors(ck: Path, names: list[str], *, from_index: bool = True) -> None:
    by_shard: dict[Path, list[str]] = {}
    for name in names:
        by_shard.setdefault(_tensor_shard(ck, name), []).append(name)
    for shard, gone in by_shard.items():
        header, data = read_shard(shard)
        for name in gone:
            header.pop(name)
        write_shard(shard, header, data)
    if from_index:
        index = _get_json(ck / INDEX)
        for name in names:
            index["weight_map"].pop(name)
        _put_json(ck / INDEX, index)


def _tensor_bytes(ck: Path, name: str) -> tuple[str, list[int], bytes]:
    header, data = read_shard(_tensor_shard(ck, name))
    e = header[name]
    b, end = e["data_offsets"]
    return e["dtype"], e["shape"], data[b:end]


# ---- mutators: each changes the checkpoint in `ck` (or the argv) and says what it did ------------------


def _config_value(ck: Path, rng: random.Random, argv: list[str]) -> str:
    cfg = _get_json(ck / "config.json")
    key = rng.choice(INT_KEYS + FLOAT_KEYS + OTHER_KEYS)
    value = rng.choice(HOSTILE)
    orig = cfg.get(key)
    if isinstance(orig, int) and not isinstance(orig, bool) and rng.random() < 0.4:
        value = rng.choice([orig + 1, orig - 1, orig * 2, orig // 2, 1000, 3, 2, 7])  # plausible, contradicts the tensors
    if value is DROP:
        cfg.pop(key, None)
    else:
        cfg[key] = value
    _put_json(ck / "config.json", cfg)
    return f"config {key}={'(missing)' if value is DROP else repr(value)[:40]}"


def _rope(ck: Path, rng: random.Random, argv: list[str]) -> str:
    cfg = _get_json(ck / "config.json")
    params = rng.choice([
        {"rope_type": "linear", "factor": rng.choice([2.0, 0, -1, "x", None])},
        {"rope_type": "linear"},
        {"rope_type": "llama3", "factor": rng.choice([8.0, 0]), "low_freq_factor": rng.choice([1.0, 0, 4.0]),
         "high_freq_factor": rng.choice([4.0, 1.0, 0]), "original_max_position_embeddings": rng.choice([8192, 0, -1, "x"])},
        {"rope_type": "yarn", "factor": 4.0},
        {"rope_type": ["x"]},
        {"rope_theta": rng.choice([0, -1, "x", None, 1e40, 5e5])},
    ])
    cfg[rng.choice(["rope_scaling", "rope_parameters"])] = params
    _put_json(ck / "config.json", cfg)
    return f"rope {json.dumps(params)[:80]}"


def _garbage(rng: random.Random, good: bytes) -> tuple[str, bytes]:
    kind = rng.choice(["truncated", "flipped", "utf8", "empty", "deep", "null", "list", "string", "number", "nan"])
    data = {
        "truncated": good[: rng.randrange(max(1, len(good)))],
        "flipped": bytes(b ^ (rng.randrange(1, 256) if rng.random() < 0.02 else 0) for b in good),
        "utf8": good[:20] + b"\xff\xfe\xc3" + good[20:],
        "empty": b"",
        "deep": b"[" * 100_000 + b"]" * 100_000,
        "null": b"null",
        "list": b"[1, 2, 3]",
        "string": b'"config"',
        "number": b"12",
        "nan": b"NaN",
    }[kind]
    return kind, data


def _json_broken(ck: Path, rng: random.Random, argv: list[str]) -> str:
    name = rng.choice(["config.json", "config.json", INDEX, "tokenizer_config.json", "generation_config.json"])
    kind, data = _garbage(rng, (ck / name).read_bytes())
    put(ck / name, data)
    return f"{name} {kind}"


def _index(ck: Path, rng: random.Random, argv: list[str]) -> str:
    index = _get_json(ck / INDEX)
    name = rng.choice(sorted(index["weight_map"]))
    kind = rng.choice(["weight_map", "traversal", "absolute", "json-as-shard", "nonexistent", "number", "extra", "dropped"])
    if kind == "weight_map":
        index["weight_map"] = rng.choice([[], {}, "x", None, 5])
    elif kind == "traversal":
        index["weight_map"][name] = "../" + index["weight_map"][name]
    elif kind == "absolute":
        index["weight_map"][name] = rng.choice(["/dev/zero", "/etc/passwd", "/"])
    elif kind == "json-as-shard":
        index["weight_map"][name] = "config.json"
    elif kind == "nonexistent":
        index["weight_map"][name] = "model-99999-of-99999.safetensors"
    elif kind == "number":
        index["weight_map"][name] = rng.choice([5, None, [], ""])
    elif kind == "extra":
        index["weight_map"]["model.layers.0.extra.weight"] = index["weight_map"][name]
    else:  # a tensor the shards hold but the index does not name: still read
        index["weight_map"].pop(name)
    _put_json(ck / INDEX, index)
    return f"index {kind} {name}"


def _header_length(ck: Path, rng: random.Random, argv: list[str]) -> str:
    shard = rng.choice(_shards(ck))
    header, data = read_shard(shard)
    size = shard.stat().st_size
    length = rng.choice([0, 1, 7, 2**64 - 1, 2**63, 2**32, size, size - 8, rng.randrange(size), 100 * 2**20 + 1])
    if rng.random() < 0.3:
        put(shard, shard.read_bytes()[: rng.choice([0, 3, 8, 9])])
        return f"{shard.name} cut to {shard.stat().st_size} bytes"
    write_shard(shard, header, data, length=length)
    return f"{shard.name} header length {length}"


def _header_json(ck: Path, rng: random.Random, argv: list[str]) -> str:
    shard = rng.choice(_shards(ck))
    raw = shard.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    kind, text = _garbage(rng, raw[8:8 + n])
    if len(text) < n:
        text += b" " * (n - len(text)) if kind != "deep" else b""
    put(shard, struct.pack("<Q", len(text)) + text + raw[8 + n:])
    return f"{shard.name} header {kind}"


def _header_entry(ck: Path, rng: random.Random, argv: list[str]) -> str:
    shard = rng.choice(_shards(ck))
    header, data = read_shard(shard)
    name = rng.choice(sorted(k for k in header if k != "__metadata__"))
    e = header[name]
    b, end = e["data_offsets"]
    rows, cols = (e["shape"] + [1])[:2]
    field = rng.choice(["dtype", "shape", "shape", "data_offsets", "entry", "metadata"])
    value: object
    if field == "dtype":
        e["dtype"] = value = rng.choice(["F64", "I8", "U8", "BOOL", "F8_E4M3", "bf16", "F32", "F16", "I64", 123, None, [], ""])
    elif field == "shape":
        e["shape"] = value = rng.choice([[], [0], [-1], [2**62, 2**62], [2**31] * 4, [2**32, 2**32, 4], ["a"], "ab", None,
                                 [cols, rows], [rows * cols], [1, rows, cols], [rows, cols, 1], [rows // 2, cols * 2],
                                 [0, rows * cols], [True, cols], [1.5, 2]])
    elif field == "data_offsets":
        e["data_offsets"] = value = rng.choice([[0, 2**63], [-5, end - b - 5], [end, b], [b + 2, end + 2], [0, 0], "ab", [1],
                                        None, [b, len(data) + 100], [b + 0.5, end], [str(b), str(end)]])
    elif field == "entry":
        header[name] = value = rng.choice(["x", 5, [], None, {}])
    else:
        header["__metadata__"] = value = rng.choice([5, "x", [], {"format": ["pt"]}])
    write_shard(shard, header, data)
    return f"{shard.name} {name} {field}={json.dumps(value)[:40]}"


def _extra_tensor(ck: Path, rng: random.Random, argv: list[str]) -> str:
    cfg = _get_json(ck / "config.json")
    layers, hidden = cfg["num_hidden_layers"], cfg["hidden_size"]
    norm = ("BF16", [hidden], bytes(2 * hidden))
    kind = rng.choice(["layer", "whole-layer", "expert", "unknown", "dense-in-moe", "ignored", "duplicate", "huge-index",
                       "leading-zero", "wrong-shape", "router-shape"])
    if kind == "whole-layer":  # every tensor of layer 0 again as layer N: llama.cpp refuses such a file
        prefix = "model.layers.0."
        _add_tensors(ck, {f"model.layers.{layers}." + n[len(prefix):]: _tensor_bytes(ck, n)
                          for n in _tensor_names(ck) if n.startswith(prefix)})
        return f"extra layer {layers} (all its tensors)"
    name, tensor = {
        "layer": (f"model.layers.{layers}.input_layernorm.weight", norm),
        "expert": ("model.layers.0.block_sparse_moe.experts.8.w1.weight",
                   _tensor_bytes(ck, "model.layers.0.block_sparse_moe.experts.0.w1.weight")),
        "unknown": ("model.foo.weight", norm),
        "dense-in-moe": ("model.layers.0.mlp.gate_proj.weight", _tensor_bytes(ck, "model.layers.0.block_sparse_moe.experts.0.w1.weight")),
        "ignored": ("model.layers.0.self_attn.rotary_emb.inv_freq", ("F32", [32], bytes(128))),
        "duplicate": ("model.norm.weight", norm),
        "huge-index": ("model.layers.99999999999999999999.input_layernorm.weight", norm),
        "leading-zero": ("model.layers.01.input_layernorm.weight", norm),
        "wrong-shape": ("model.layers.0.post_attention_layernorm.weight", ("BF16", [hidden + 32], bytes(2 * hidden + 64))),
        "router-shape": ("model.layers.1.block_sparse_moe.gate.weight", ("BF16", [9, hidden], bytes(18 * hidden))),
    }[kind]
    if kind in ("wrong-shape", "router-shape"):  # replaces the real one
        _remove_tensors(ck, [name])
    _add_tensors(ck, {name: tensor})
    return f"extra tensor {kind} {name}"


def _missing_tensor(ck: Path, rng: random.Random, argv: list[str]) -> str:
    cfg = _get_json(ck / "config.json")
    names = _tensor_names(ck)
    kind = rng.choice(["one", "one-header-only", "last-layer", "last-layer-consistent", "lm_head"])
    if kind.startswith("last-layer"):
        last = f"model.layers.{cfg['num_hidden_layers'] - 1}."
        _remove_tensors(ck, [n for n in names if n.startswith(last)])
        if kind == "last-layer-consistent":  # a valid, smaller model
            cfg["num_hidden_layers"] -= 1
            _put_json(ck / "config.json", cfg)
        return f"removed {kind}"
    name = "lm_head.weight" if kind == "lm_head" else rng.choice(names)
    _remove_tensors(ck, [name], from_index=kind != "one-header-only")
    return f"removed {kind} {name}"


def _non_finite(ck: Path, rng: random.Random, argv: list[str]) -> str:
    name = rng.choice(_tensor_names(ck))
    shard = _tensor_shard(ck, name)
    header, data = read_shard(shard)
    e = header[name]
    b, end = e["data_offsets"]
    what = rng.choice(["nan", "inf", "-inf"])
    value = {"BF16": {"nan": b"\xc0\x7f", "inf": b"\x80\x7f", "-inf": b"\x80\xff"},
             "F16": {"nan": b"\x00\x7e", "inf": b"\x00\x7c", "-inf": b"\x00\xfc"},
             "F32": {"nan": b"\x00\x00\xc0\x7f", "inf": b"\x00\x00\x80\x7f", "-inf": b"\x00\x00\x80\xff"}}[e["dtype"]][what]
    at = b + rng.randrange((end - b) // len(value)) * len(value)
    write_shard(shard, header, data[:at] + value + data[at + len(value):])
    return f"{what} in {name}"


def _tokenizer(ck: Path, rng: random.Random, argv: list[str]) -> str:
    kind = rng.choice(["model-garbage", "model-truncated", "model-empty", "model-missing", "bpe", "bpe", "added", "config",
                       "template"])
    sp = ck / "tokenizer.model"
    if kind == "model-garbage":
        put(sp, bytes(rng.randrange(256) for _ in range(rng.choice([1, 100, 5000]))))
    elif kind == "model-truncated":
        put(sp, sp.read_bytes()[: rng.randrange(sp.stat().st_size)])
    elif kind == "model-empty":
        put(sp, b"")
    elif kind == "model-missing":
        sp.unlink()
    elif kind == "bpe":  # no tokenizer.model: tokenizer.json is read instead
        sp.unlink()
        vocab = {"a": 0, "b": 1, "ab": 2}
        good = {"model": {"type": "BPE", "vocab": vocab, "merges": ["a b"]}, "added_tokens": [{"id": 3, "content": "<s>", "special": True}]}
        doc = rng.choice([
            None, {"model": "x"}, {"model": {"type": "BPE"}}, {"model": {"type": "BPE", "vocab": []}},
            {"model": {"type": "BPE", "vocab": {"a": "x"}}}, {"model": {"type": "BPE", "vocab": {"a": 10**12}}},
            {"model": {"type": "BPE", "vocab": {"a": -1}}}, {"model": {"type": "BPE", "vocab": {}}},
            {**good, "added_tokens": [5]}, {**good, "added_tokens": [{"id": "x"}]}, {**good, "added_tokens": {"a": 1}},
            {**good, "model": {**good["model"], "merges": [5]}}, {**good, "model": {**good["model"], "merges": "x"}},
            {**good, "post_processor": 5}, good, [], 5,
        ])
        if doc is None:
            put(ck / "tokenizer.json", _garbage(rng, json.dumps(good).encode())[1])
            return "tokenizer.json garbage"
        _put_json(ck / "tokenizer.json", doc)
        return f"tokenizer.json {json.dumps(doc)[:60]}"
    elif kind == "added":
        doc = rng.choice([{"x": "y"}, {"x": -1}, {"x": 10**12}, [], 5, {"<new>": 5}])
        _put_json(ck / "added_tokens.json", doc)
        return f"added_tokens.json {json.dumps(doc)}"
    elif kind == "config":
        cfg = _get_json(ck / "tokenizer_config.json")
        key, value = rng.choice([
            ("added_tokens_decoder", []), ("added_tokens_decoder", {"x": {"content": "a"}}),
            ("added_tokens_decoder", {"5": "str"}), ("added_tokens_decoder", {"5": {"content": 5}}),
            ("added_tokens_decoder", {"5": {}}), ("added_tokens_decoder", {"-1": {"content": "a"}}),
            ("added_tokens_decoder", {"99999999999": {"content": "a"}}), ("chat_template", 5), ("chat_template", {"a": 1}),
            ("chat_template", [5]), ("bos_token", 5), ("bos_token", {"content": 5}), ("add_bos_token", "yes"),
        ])
        cfg[key] = value
        _put_json(ck / "tokenizer_config.json", cfg)
        return f"tokenizer_config {key}={json.dumps(value)[:40]}"
    else:
        target = ck / "chat_template.jinja"
        if rng.random() < 0.5:
            put(target, b"{{ bos_token }}\xff\xfe")
        else:
            target.mkdir()
    return f"tokenizer {kind}"


def _files(ck: Path, rng: random.Random, argv: list[str]) -> str:
    kind = rng.choice(["config-dir", "shard-dir", "shard-devzero", "shard-empty", "no-index", "config-loop", "index-dir"])
    if kind == "config-dir":
        (ck / "config.json").unlink()
        (ck / "config.json").mkdir()
    elif kind == "index-dir":
        (ck / INDEX).unlink()
        (ck / INDEX).mkdir()
    elif kind == "shard-dir":
        shard = rng.choice(_shards(ck))
        shard.unlink()
        shard.mkdir()
    elif kind == "shard-devzero":
        shard = rng.choice(_shards(ck))
        shard.unlink()
        shard.symlink_to("/dev/zero")
    elif kind == "shard-empty":
        put(rng.choice(_shards(ck)), b"")
    elif kind == "no-index":
        (ck / INDEX).unlink()
    else:
        (ck / "config.json").unlink()
        (ck / "config.json").symlink_to("config.json")
    return f"files {kind}"


def _flags(ck: Path, rng: random.Random, argv: list[str]) -> str:
    kind = rng.choice(["threads", "threads", "out-missing-dir", "out-is-dir", "out-is-dir-force", "out-empty"])
    if kind == "threads":
        value = rng.choice(["-1", "0", str(10**12), "1", "3"])
        argv += ["--threads", value]
        return f"--threads {value}"
    i = argv.index("-o") + 1
    if kind == "out-missing-dir":
        argv[i] = "nowhere/out.gguf"
    elif kind == "out-empty":
        argv[i] = ""
    else:
        (ck.parent / OUT).mkdir()
        if kind == "out-is-dir-force":
            argv.append("--force")
    return f"output {kind}"


def _valid(ck: Path, rng: random.Random, argv: list[str]) -> str:
    cfg = _get_json(ck / "config.json")
    key, value = rng.choice([("rope_theta", 5e5), ("max_position_embeddings", 8192), ("rms_norm_eps", 1e-6),
                             ("head_dim", cfg["hidden_size"] // cfg["num_attention_heads"]), ("pad_token_id", 0),
                             ("eos_token_id", [2]), ("tie_word_embeddings", True)])
    if rng.random() < 0.5:
        cfg[key] = value
        _put_json(ck / "config.json", cfg)
        return f"valid {key}={value}"
    return "unchanged"


# (mutator, weight)
MUTATORS: list[tuple[Callable[[Path, random.Random, list[str]], str], int]] = [
    (_config_value, 8), (_rope, 2), (_json_broken, 3), (_index, 2), (_header_length, 2), (_header_json, 2),
    (_header_entry, 4), (_extra_tensor, 3), (_missing_tensor, 2), (_non_finite, 3), (_tokenizer, 3), (_files, 1),
    (_flags, 2), (_valid, 2),
]


# ---- cases ------------------------------------------------------------------------------------------


def base_checkpoint(workdir: Path) -> Path:
    """The tiny Mixtral, built once in `workdir` when no base is given."""
    base = workdir / "base"
    if not (base / "config.json").is_file():
        from tests.support.checkpoints import make_tiny_mixtral

        make_tiny_mixtral(base)
    return base


def make_case(i: int, seed: int, workdir: Path, base: Path, timeout: float = 60.0) -> Case:
    rng = random.Random(f"{seed}:{i}")
    folder = workdir / f"{i:04d}"
    linked_copy(base, folder / "ckpt")
    argv = ["quantize", "ckpt", "-o", OUT, "--type", rng.choice(["Q4_0", "Q8_0", "Q8_0", "Q4_K_M", "BF16"])]
    mutators, weights = zip(*MUTATORS, strict=True)
    mutate = rng.choices(mutators, weights)[0]
    label = mutate(folder / "ckpt", rng, argv)
    return Case(argv=argv, cwd=str(folder), timeout=timeout, label=label)


def cases(seed: int, n: int, workdir: Path, base: Path | None = None, timeout: float = 60.0) -> list[Case]:
    """`n` cases, the same for the same seed; `base` defaults to a tiny Mixtral built in `workdir`."""
    workdir.mkdir(parents=True, exist_ok=True)
    base = base or base_checkpoint(workdir)
    return [make_case(i, seed, workdir, base, timeout) for i in range(n)]


def main(argv: list[str] | None = None) -> int:
    """`python -m tests.fuzz.checkpoints [--seed S] [--n N]`: a sweep, with totals per kind of outcome. Every
    success must give a GGUF that localmix opens and nothing may be left but that output."""
    import argparse
    import collections
    import os
    import tempfile
    import time

    from tests.fuzz.harness import Harness, isolated_env

    p = argparse.ArgumentParser(prog="python -m tests.fuzz.checkpoints")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--show", type=int, default=40, help="failures to print")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="fuzz-ckpt-") as tmp:
        home = Path(tmp) / "home"
        env = isolated_env(home)
        os.environ.update(env)
        from localmix.hardware import detect
        from localmix.modelfile import open_model_file
        from quantize.errors import Error

        detect()  # a success ends with a plan summary: the bandwidth probes once, before the cases
        all_cases = cases(args.seed, args.n, Path(tmp) / "cases")
        t0 = time.monotonic()
        with Harness(env=env, workers=args.workers) as h:
            outcomes = h.run(all_cases)
        seconds = time.monotonic() - t0
        named = {"ok": "refused in one line"}
        kinds = collections.Counter("converted" if o.ok and o.code == 0 else named.get(o.kind, o.kind) for o in outcomes)
        left = [f"[{o.case.label}] {f}" for o in outcomes for f in o.new_files if not (o.code == 0 and f == OUT)]
        unreadable = []
        for o in outcomes:
            if o.code == 0:
                try:
                    open_model_file(Path(o.case.cwd) / OUT)
                except Error as e:
                    unreadable.append(f"[{o.case.label}] {e}")
    print(f"{len(outcomes)} cases in {seconds:.0f} s: " + ", ".join(f"{k} {v}" for k, v in sorted(kinds.items()))
          + f"; {len(left)} files left behind; {len(unreadable)} outputs localmix cannot open")
    bad = [o for o in outcomes if not o.ok]
    for line in [o.describe() for o in bad][: args.show] + left[: args.show] + unreadable[: args.show]:
        print(" ", line[:500])
    return 1 if bad or left or unreadable else 0


if __name__ == "__main__":
    raise SystemExit(main())
