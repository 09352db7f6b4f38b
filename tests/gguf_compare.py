"""Reading GGUF files back for comparisons."""

from __future__ import annotations

from pathlib import Path

import gguf


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
