"""GGUF files for tests: read back for comparisons, and written split by gguf-py's own split writer (the
format `llama-gguf-split` writes: part 1 with the metadata, every part with split.no / split.count /
split.tensors.count and its own tensor table), with real data or as sparse files of real shapes."""

from __future__ import annotations

import os
from pathlib import Path

import gguf
import numpy as np


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
