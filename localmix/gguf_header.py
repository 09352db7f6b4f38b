"""A fast, careful reader of a GGUF file's header: metadata and tensor table, without touching weights.

gguf's GGUFReader builds numpy views for every array element (seconds for a 50k-token vocabulary);
`plan` and `run` need a few keys and the tensor table at once. Every length is checked against the
file size, so a truncated or corrupt file is reported before llama.cpp is asked to load it.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

# GGUF value types -> struct format (scalars); 8 = string, 9 = array.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
STRING, ARRAY = 8, 9
# Arrays whose values nobody here reads are skipped, not decoded.
SKIP_ARRAYS = {"tokenizer.ggml.merges", "tokenizer.ggml.scores", "tokenizer.ggml.token_type"}


class GGUFError(Exception):
    pass


@dataclass(frozen=True)
class TensorEntry:
    name: str
    shape: tuple[int, ...]  # ggml order: ne[0] (row length) first
    type: GGMLQuantizationType
    offset: int  # absolute, in the file
    nbytes: int

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


class _Cursor:
    def __init__(self, buf, size: int):
        self.buf, self.pos, self.size = buf, 0, size

    def take(self, n: int) -> int:
        if n < 0 or self.pos + n > self.size:
            raise GGUFError("truncated or corrupt GGUF header")
        at = self.pos
        self.pos += n
        return at

    def unpack(self, fmt: str):
        at = self.take(struct.calcsize(fmt))
        return struct.unpack_from(fmt, self.buf, at)[0]

    def string(self) -> str:
        n = self.unpack("<Q")
        at = self.take(n)
        return bytes(self.buf[at : at + n]).decode("utf-8", errors="replace")

    def value(self, vtype: int, key: str = ""):
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype])
        if vtype == STRING:
            return self.string()
        if vtype == ARRAY:
            etype, n = self.unpack("<I"), self.unpack("<Q")
            if key in SKIP_ARRAYS and etype in _SCALARS:
                self.take(n * struct.calcsize(_SCALARS[etype]))
                return None
            if key in SKIP_ARRAYS:
                for _ in range(n):
                    self.value(etype)
                return None
            return [self.value(etype) for _ in range(n)]
        raise GGUFError(f"corrupt GGUF header: unknown value type {vtype}")


def read_header(path: str | Path) -> tuple[dict, list[TensorEntry]]:
    path = Path(path)
    size = path.stat().st_size
    if size < 24:
        raise GGUFError("not a GGUF file")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != b"GGUF":
            raise GGUFError("not a GGUF file")
        c = _Cursor(buf, size)
        c.take(4)
        version, n_tensors, n_kv = c.unpack("<I"), c.unpack("<Q"), c.unpack("<Q")
        if version not in (2, 3):
            raise GGUFError(f"unsupported GGUF version {version}")
        if n_tensors > 1 << 20 or n_kv > 1 << 20:
            raise GGUFError("corrupt GGUF header")
        kv = {}
        for _ in range(n_kv):
            key = c.string()
            kv[key] = c.value(c.unpack("<I"), key)
        raw = []
        for _ in range(n_tensors):
            name = c.string()
            n_dims = c.unpack("<I")
            if n_dims > 4:
                raise GGUFError(f"corrupt GGUF header: tensor {name} has {n_dims} dimensions")
            shape = tuple(c.unpack("<Q") for _ in range(n_dims))
            ttype, offset = c.unpack("<I"), c.unpack("<Q")
            raw.append((name, shape, ttype, offset))
        align = int(kv.get("general.alignment", 32))
        data_start = -(-c.pos // align) * align
    tensors = []
    for name, shape, ttype, offset in raw:
        try:
            t = GGMLQuantizationType(ttype)
            block, type_size = GGML_QUANT_SIZES[t]
        except (ValueError, KeyError):
            raise GGUFError(f"tensor {name} has unknown type {ttype}") from None
        rows = 1
        for d in shape[1:]:
            rows *= d
        nbytes = rows * (shape[0] // block) * type_size if shape else 0
        entry = TensorEntry(name, shape, t, data_start + offset, nbytes)
        if entry.offset + nbytes > size:
            raise GGUFError(f"truncated GGUF file (tensor {name} ends past the end of the file)")
        tensors.append(entry)
    return kv, tensors
