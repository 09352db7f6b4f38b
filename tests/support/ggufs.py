"""GGUF files for tests: read back for comparisons, and written split by gguf-py's own split writer (the
format `llama-gguf-split` writes: part 1 with the metadata, every part with split.no / split.count /
split.tensors.count and its own tensor table), with real data or as sparse files of real shapes; and
written by hand (`Model`, `serialise`): a small real model whose header a test may break in any way."""

from __future__ import annotations

import dataclasses
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType


def tensor_table(path: Path) -> dict[str, tuple[str, bytes]]:
    """name -> (ggml type name, data bytes), in file order."""
    r = gguf.GGUFReader(path)
    return {t.name: (t.tensor_type.name, t.data.tobytes()) for t in r.tensors}


def differences(a: Path, b: Path) -> list[str]:
    ta, tb = tensor_table(a), tensor_table(b)
    out = []
    if list(ta) != list(tb):
        out.append(f"tensor lists differ: {sorted(set(ta) ^ set(tb))[:5]} or order")
    for name in ta.keys() & tb.keys():
        (type_a, data_a), (type_b, data_b) = ta[name], tb[name]
        if type_a != type_b:
            out.append(f"{name}: type {type_a} vs {type_b}")
        elif data_a != data_b:
            out.append(f"{name}: same type {type_a}, different bytes")
    return sorted(out)


def metadata(path: Path) -> dict:
    r = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}


def _copy_metadata(r: gguf.GGUFReader, w: gguf.GGUFWriter) -> None:
    for key, field in r.fields.items():
        if key.startswith(("GGUF.", "split.")) or key == "general.architecture":
            continue
        vtype = field.types[0]
        sub = field.types[1] if vtype == gguf.GGUFValueType.ARRAY and len(field.types) > 1 else None
        w.add_key_value(key, field.contents(), vtype, sub_type=sub)


def split_copy(src: Path, out: Path, *, first_part_tensors: int | None = None, max_tensors: int | None = None) -> list[Path]:
    """`src` rewritten as a split GGUF named after `out` (`OUT-00001-of-0000N.gguf`...) by gguf-py's split
    writer; returns the parts. `first_part_tensors` or `max_tensors` say where parts end."""
    out.parent.mkdir(parents=True, exist_ok=True)
    r = gguf.GGUFReader(src)
    arch = r.fields["general.architecture"].contents()
    w = gguf.GGUFWriter(out, arch=arch, split_max_tensors=max_tensors or first_part_tensors)
    _copy_metadata(r, w)
    for i, t in enumerate(r.tensors):
        w.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
        if first_part_tensors and i == first_part_tensors:  # the second part has begun: it takes the rest
            w.split_max_tensors = len(r.tensors)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return w.format_shard_names(out)


def sparse_split(out: Path, kv: dict, tensors: list[tuple[str, tuple[int, ...], gguf.GGMLQuantizationType, int]],
                 *, max_size: int) -> list[Path]:
    """A split GGUF with real headers and no data: each part's data section is a hole (os.truncate), so a
    file of Mixtral 8x22B's shapes costs no disk. `tensors`: (name, numpy shape, type, bytes)."""
    w = gguf.GGUFWriter(out, arch=kv.pop("general.architecture", "llama"), split_max_size=max_size)
    for key, value in kv.items():
        if isinstance(value, str):
            w.add_string(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        else:
            w.add_uint32(key, value)
    for name, shape, ttype, nbytes in tensors:
        w.add_tensor_info(name, shape, np.dtype(np.float32), nbytes, raw_dtype=ttype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for fout, part in zip(w.fout, w.tensors):
        start = fout.tell() + (-fout.tell() % w.data_alignment)
        fout.flush()
        os.truncate(fout.fileno(), start + sum(ti.nbytes + (-ti.nbytes % w.data_alignment) for ti in part.values()))
    w.close()
    return w.format_shard_names(out)


# -- written by hand -------------------------------------------------------------------------------------------
# A GGUF as a structure (typed metadata, tensors with shapes, types and bytes) that `serialise` writes byte for
# byte as the spec lays it out, with whatever a test left in it: gguf-py's writer refuses most broken headers.

U8, I8, U16, I16, U32, I32, F32, BOOL, STR, ARR, U64, I64, F64 = range(13)
_FMT = {U8: "<B", I8: "<b", U16: "<H", I16: "<h", U32: "<I", I32: "<i", F32: "<f", BOOL: "<?", U64: "<Q", I64: "<q", F64: "<d"}
F16, F32_T = GGMLQuantizationType.F16, GGMLQuantizationType.F32
ALIGN = 32

N_LAYER, N_EMBD, N_FF, N_HEAD, N_HEAD_KV, N_EXPERT, N_USED, CTX = 2, 32, 32, 4, 2, 4, 2, 4096
TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
            "{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")


@dataclass
class KV:
    key: str | bytes
    type: int
    value: object  # str/bytes for STR, a list for ARR (with `sub`), a number otherwise
    sub: int = 0  # element type of an array


@dataclass
class TensorInfo:
    name: str | bytes
    shape: list[int]  # ggml order: row length first
    type: int
    data: bytes
    offset: int | None = None  # None: where the writer puts its data


@dataclass
class Model:
    kv: list[KV] = dataclasses.field(default_factory=list)
    tensors: list[TensorInfo] = dataclasses.field(default_factory=list)
    version: int = 3

    def get(self, key: str) -> KV | None:
        return next((k for k in self.kv if k.key == key), None)


# -- the base model (llama.cpp loads and runs it) ------------------------------------------------------------------------------------------


def _vocab() -> tuple[list[str], list[float], list[int]]:
    tokens, scores, types = ["<unk>", "<s>", "</s>"], [0.0, 0.0, 0.0], [2, 3, 3]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    scores += [0.0] * 256
    types += [6] * 256
    pieces = ["▁"] + [chr(c) for c in range(ord("a"), ord("z") + 1)] + ["▁" + chr(c) for c in range(ord("a"), ord("n"))]
    tokens += pieces
    scores += [-float(i) for i in range(len(pieces))]
    types += [1] * len(pieces)
    return tokens, scores, types


def base_model(seed: int = 0) -> Model:
    """A small Mixtral-shaped model that llama.cpp loads and runs (random weights)."""
    rng = np.random.default_rng(seed)
    tokens, scores, ttypes = _vocab()
    a = "llama"
    m = Model()
    m.kv = [
        KV("general.architecture", STR, a), KV("general.name", STR, "fuzz-moe"), KV("general.file_type", U32, 1),
        KV(f"{a}.block_count", U32, N_LAYER), KV(f"{a}.context_length", U32, CTX), KV(f"{a}.embedding_length", U32, N_EMBD),
        KV(f"{a}.feed_forward_length", U32, N_FF), KV(f"{a}.attention.head_count", U32, N_HEAD),
        KV(f"{a}.attention.head_count_kv", U32, N_HEAD_KV), KV(f"{a}.rope.freq_base", F32, 1e6),
        KV(f"{a}.attention.layer_norm_rms_epsilon", F32, 1e-5), KV(f"{a}.expert_count", U32, N_EXPERT),
        KV(f"{a}.expert_used_count", U32, N_USED), KV(f"{a}.rope.dimension_count", U32, N_EMBD // N_HEAD),
        KV(f"{a}.vocab_size", U32, len(tokens)),
        KV("tokenizer.ggml.model", STR, "llama"), KV("tokenizer.ggml.tokens", ARR, tokens, STR),
        KV("tokenizer.ggml.scores", ARR, scores, F32), KV("tokenizer.ggml.token_type", ARR, ttypes, I32),
        KV("tokenizer.ggml.bos_token_id", U32, 1), KV("tokenizer.ggml.eos_token_id", U32, 2),
        KV("tokenizer.ggml.unknown_token_id", U32, 0), KV("tokenizer.ggml.add_bos_token", BOOL, True),
        KV("tokenizer.chat_template", STR, TEMPLATE),
    ]

    def t(name: str, *shape: int) -> None:
        f32 = len(shape) == 1 or "ffn_gate_inp" in name
        n = int(np.prod(shape))
        data = (rng.standard_normal(n) * (1.0 if len(shape) == 1 else 0.2)).astype(np.float32 if f32 else np.float16)
        if len(shape) == 1:
            data = np.ones(n, np.float32)
        m.tensors.append(TensorInfo(name, list(shape), F32_T if f32 else F16, data.tobytes()))

    hd = N_EMBD // N_HEAD
    t("token_embd.weight", N_EMBD, len(tokens))
    for b in range(N_LAYER):
        t(f"blk.{b}.attn_norm.weight", N_EMBD)
        t(f"blk.{b}.attn_q.weight", N_EMBD, N_EMBD)
        t(f"blk.{b}.attn_k.weight", N_EMBD, N_HEAD_KV * hd)
        t(f"blk.{b}.attn_v.weight", N_EMBD, N_HEAD_KV * hd)
        t(f"blk.{b}.attn_output.weight", N_EMBD, N_EMBD)
        t(f"blk.{b}.ffn_norm.weight", N_EMBD)
        t(f"blk.{b}.ffn_gate_inp.weight", N_EMBD, N_EXPERT)
        t(f"blk.{b}.ffn_gate_exps.weight", N_EMBD, N_FF, N_EXPERT)
        t(f"blk.{b}.ffn_up_exps.weight", N_EMBD, N_FF, N_EXPERT)
        t(f"blk.{b}.ffn_down_exps.weight", N_FF, N_EMBD, N_EXPERT)
    t("output_norm.weight", N_EMBD)
    t("output.weight", N_EMBD, len(tokens))
    return m


# -- writing ------------------------------------------------------------------------------------------------


def _b(s: str | bytes) -> bytes:
    return s if isinstance(s, bytes) else s.encode("utf-8", errors="surrogateescape")


def _str(s: str | bytes) -> bytes:
    data = _b(s)
    return struct.pack("<Q", len(data)) + data


def _scalar(vtype: int, value) -> bytes:
    fmt = _FMT[vtype]
    if vtype in (F32, F64):
        return struct.pack(fmt, float(value))
    if vtype == BOOL:
        return struct.pack(fmt, bool(value))
    bits = struct.calcsize(fmt) * 8
    return struct.pack(fmt.upper(), int(value) % (1 << bits))  # wrap: -1 as a u32 is 0xffffffff


def _value(vtype: int, value, sub: int = 0) -> bytes:
    if vtype == STR:
        return _str(value)
    if vtype == ARR:
        return struct.pack("<IQ", sub, len(value)) + b"".join(_value(sub, v) for v in value)
    return _scalar(vtype, value)


def serialise(m: Model) -> bytes:
    head = [b"GGUF", struct.pack("<IQQ", m.version, len(m.tensors), len(m.kv))]
    for kv in m.kv:
        head.append(_str(kv.key) + struct.pack("<I", kv.type) + _value(kv.type, kv.value, kv.sub))
    data, pos = [], 0
    for t in m.tensors:
        pad = -pos % ALIGN
        data.append(b"\0" * pad + t.data)
        pos += pad
        offset = pos if t.offset is None else t.offset
        pos += len(t.data)
        head.append(_str(t.name) + struct.pack("<I", len(t.shape)) + b"".join(struct.pack("<Q", d % (1 << 64)) for d in t.shape)
                    + struct.pack("<IQ", t.type % (1 << 32), offset % (1 << 64)))
    header = b"".join(head)
    return header + b"\0" * (-len(header) % ALIGN) + b"".join(data)


def write(m: Model, path: Path) -> Path:
    path.write_bytes(serialise(m))
    return path


