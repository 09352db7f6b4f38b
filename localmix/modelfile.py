"""A model on disk: one GGUF file, or a split GGUF (`NAME-00001-of-00003.gguf` ... as `llama-gguf-split`
and gguf-py's split writer make them), read as one model. This is the only module that parses GGUF
headers and split names.

A split model's metadata lives in part 1; every part lists its own tensors, with offsets into its own
data section, and carries `split.no`, `split.count` and (part 1 at least) `split.tensors.count`. Opening
checks all of it part by part: every part present, the numbers consistent, every tensor's extent inside
its part. What comes out is the merged header: part 1's metadata and the tensors of all parts, each
with its part and offset.

The reader is ours rather than gguf's GGUFReader, which builds numpy views for every array element
(seconds for a 50k-token vocabulary); every length is checked against the file size, so a truncated or
corrupt file is reported before llama.cpp is asked to load it.
"""

from __future__ import annotations

import mmap
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from .errors import ModelFileError

SPLIT_NAME = re.compile(r"^(?P<stem>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")
SPLIT_NO, SPLIT_COUNT, SPLIT_TENSORS = "split.no", "split.count", "split.tensors.count"

# GGUF value types -> struct format (scalars); 8 = string, 9 = array.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
STRING, ARRAY = 8, 9
# Arrays whose values nobody here reads are skipped, not decoded.
SKIP_ARRAYS = {"tokenizer.ggml.merges", "tokenizer.ggml.scores", "tokenizer.ggml.token_type"}


def split_name(stem: str, no: int, count: int) -> str:
    """The file name of part `no` (1-based) of `count`."""
    return f"{stem}-{no:05d}-of-{count:05d}.gguf"


def parse_split_name(name: str) -> tuple[str, int, int] | None:
    """(stem, part number, part count) of a split file name, None for any other name."""
    m = SPLIT_NAME.match(name)
    return (m.group("stem"), int(m.group("no")), int(m.group("count"))) if m else None


def model_name(path: Path) -> str:
    """The name of the model a file belongs to: the file name without `.gguf` and without the part."""
    split = parse_split_name(path.name)
    return split[0] if split else path.name.removesuffix(".gguf")


@dataclass(frozen=True)
class TensorEntry:
    name: str
    shape: tuple[int, ...]  # ggml order: ne[0] (row length) first
    type: GGMLQuantizationType
    part: int  # 0-based index into ModelFile.parts
    offset: int  # absolute, in its part
    nbytes: int

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class ModelFile:
    path: Path  # the file llama.cpp opens: part 1 of a split model
    parts: tuple[Path, ...]
    kv: dict = field(repr=False)  # part 1's metadata
    tensors: tuple[TensorEntry, ...] = field(repr=False)

    @property
    def name(self) -> str:
        return model_name(self.path)

    @property
    def size(self) -> int:
        return sum(p.stat().st_size for p in self.parts)


class _Cursor:
    def __init__(self, buf, size: int):
        self.buf, self.pos, self.size = buf, 0, size

    def take(self, n: int) -> int:
        if n < 0 or self.pos + n > self.size:
            raise ModelFileError("truncated or corrupt GGUF header")
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
        raise ModelFileError(f"corrupt GGUF header: unknown value type {vtype}")


def read_part(path: Path, part: int = 0) -> tuple[dict, list[TensorEntry]]:
    """The metadata and tensor table of one GGUF file; ModelFileError for anything that is not a
    well-formed one."""
    size = path.stat().st_size
    if size < 24:
        raise ModelFileError("not a GGUF file")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != b"GGUF":
            raise ModelFileError("not a GGUF file")
        c = _Cursor(buf, size)
        c.take(4)
        version, n_tensors, n_kv = c.unpack("<I"), c.unpack("<Q"), c.unpack("<Q")
        if version not in (2, 3):
            raise ModelFileError(f"unsupported GGUF version {version}")
        if n_tensors > 1 << 20 or n_kv > 1 << 20:
            raise ModelFileError("corrupt GGUF header")
        kv = {}
        for _ in range(n_kv):
            key = c.string()
            kv[key] = c.value(c.unpack("<I"), key)
        raw = []
        for _ in range(n_tensors):
            name = c.string()
            n_dims = c.unpack("<I")
            if n_dims > 4:
                raise ModelFileError(f"corrupt GGUF header: tensor {name} has {n_dims} dimensions")
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
            raise ModelFileError(f"tensor {name} has unknown type {ttype}") from None
        rows = 1
        for d in shape[1:]:
            rows *= d
        nbytes = rows * (shape[0] // block) * type_size if shape else 0
        entry = TensorEntry(name, shape, t, part, data_start + offset, nbytes)
        if entry.offset + nbytes > size:
            raise ModelFileError(f"truncated GGUF file (tensor {name} ends past the end of the file)")
        tensors.append(entry)
    return kv, tensors


def _count(kv: dict, key: str, default: int) -> int:
    value = kv.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ModelFileError(f"corrupt GGUF header: {key} is {value!r}")
    return value


def open_model_file(path: str | Path) -> ModelFile:
    """The model a GGUF path names, all of its parts read and checked. Naming any part of a split model
    opens the whole model (from part 1, which is what llama.cpp loads)."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: no such model file")
    split = parse_split_name(path.name)
    if split and split[1] != 1:
        first = path.with_name(split_name(split[0], 1, split[2]))
        if not first.is_file():
            raise ModelFileError(f"{path}: incomplete split model: part 1 of {split[2]} ({first.name}) is missing")
        path = first
    try:
        kv, tensors = read_part(path)
    except ModelFileError as e:
        raise ModelFileError(f"{path}: {e}") from None
    count = _count(kv, SPLIT_COUNT, 1)
    if count <= 1:
        return ModelFile(path, (path,), kv, tuple(tensors))

    if not split or split[2] != count:
        raise ModelFileError(f"{path}: part 1 of a model split in {count} parts, but its name is not "
                             f"NAME-00001-of-{count:05d}.gguf, so the other parts cannot be found")
    stem = split[0]
    if _count(kv, SPLIT_NO, 0) != 0:
        raise ModelFileError(f"{path}: its header says it is part {_count(kv, SPLIT_NO, 0) + 1}, not part 1")
    parts, names = [path], {t.name for t in tensors}
    for no in range(2, count + 1):
        p = path.with_name(split_name(stem, no, count))
        if not p.is_file():
            raise ModelFileError(f"{path}: incomplete split model: part {no} of {count} ({p.name}) is missing")
        try:
            part_kv, part_tensors = read_part(p, no - 1)
        except ModelFileError as e:
            raise ModelFileError(f"{p}: {e}") from None
        if _count(part_kv, SPLIT_COUNT, 1) != count or _count(part_kv, SPLIT_NO, 0) != no - 1:
            raise ModelFileError(f"{p}: not part {no} of this model (its header says part "
                                 f"{_count(part_kv, SPLIT_NO, 0) + 1} of {_count(part_kv, SPLIT_COUNT, 1)})")
        repeated = names & {t.name for t in part_tensors}
        if repeated:
            raise ModelFileError(f"{p}: not part {no} of this model (tensor {sorted(repeated)[0]} is also in an earlier part)")
        names |= {t.name for t in part_tensors}
        parts.append(p)
        tensors += part_tensors
    expected = _count(kv, SPLIT_TENSORS, len(tensors))
    if expected != len(tensors):
        raise ModelFileError(f"{path}: the {count} parts hold {len(tensors)} tensors, part 1 says {expected}: "
                             "a part belongs to another model")
    return ModelFile(path, tuple(parts), kv, tuple(tensors))
