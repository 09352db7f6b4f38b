"""A model on disk: one GGUF file, or a split GGUF (`NAME-00001-of-00003.gguf` ... as `llama-gguf-split`
and gguf-py's split writer make them), read as one model. This is the only module that parses GGUF
headers and split names.

A split model's metadata lives in part 1; every part lists its own tensors, with offsets into its own
data section, and carries `split.no`, `split.count` and (part 1 at least) `split.tensors.count`. Opening
checks all of it part by part: every part present, the numbers consistent, every tensor's extent inside
its part. What comes out is the merged header: part 1's metadata and the tensors of all parts, each
with its part and offset.

The reader is ours rather than gguf's GGUFReader, which builds numpy views for every array element
(seconds for a 50k-token vocabulary). The file is untrusted: every count and length is checked against
the bytes left before anything is read or allocated for it, and the header is held to what llama.cpp's
own reader (ggml/src/gguf.cpp) accepts: known types, unique keys and tensor names, names within
GGML_MAX_NAME, tensor data laid out in order within the file. Then validate.check holds the metadata to
the tensor shapes. So a damaged or hostile file is one line here, never a crash inside llama.cpp.
"""

from __future__ import annotations

import mmap
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from .errors import ModelFileError
from .text import shown
from .validate import Metadata, Skipped, check

SPLIT_NAME = re.compile(r"^(?P<stem>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf\Z", re.S)  # any file name: newlines too
SPLIT_NO, SPLIT_COUNT, SPLIT_TENSORS = "split.no", "split.count", "split.tensors.count"

# GGUF value types -> struct format (scalars); 8 = string, 9 = array.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
STRING, ARRAY = 8, 9
# The fewest bytes one element of each type takes: a count is checked against the bytes left with these
# before a loop runs over it (a 40-byte file cannot hold a billion strings).
_MIN_SIZE = {**{t: struct.calcsize(f) for t, f in _SCALARS.items()}, STRING: 8, ARRAY: 12}
MAX_NAME = 63  # GGML_MAX_NAME - 1: llama.cpp's longest tensor name
MAX_KEY = 65535  # the GGUF spec's longest key
MAX_ALIGNMENT = 1 << 20
# Arrays whose values nobody here reads are skipped, not decoded (their type and length are kept).
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

    def room_for(self, n: int, vtype: int, what: str) -> None:
        """n elements of vtype can fit in what is left of the file (checked before a loop over them)."""
        if n * _MIN_SIZE.get(vtype, 1) > self.size - self.pos:
            raise ModelFileError(f"corrupt GGUF header: {what} claims {n:,} elements, more than the file can hold")

    def unpack(self, fmt: str):
        at = self.take(struct.calcsize(fmt))
        return struct.unpack_from(fmt, self.buf, at)[0]

    def string(self, limit: int | None = None, what: str = "") -> str:
        n = self.unpack("<Q")
        if limit is not None and n > limit:
            raise ModelFileError(f"corrupt GGUF header: a {what} of {n:,} bytes (at most {limit:,})")
        at = self.take(n)
        return bytes(self.buf[at : at + n]).decode("utf-8", errors="replace")

    def value(self, vtype: int, key: str = ""):
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype])
        if vtype == STRING:
            return self.string()
        if vtype == ARRAY:
            etype, n = self.unpack("<I"), self.unpack("<Q")
            if etype == ARRAY or (etype not in _SCALARS and etype != STRING):
                raise ModelFileError(f"corrupt GGUF header: {shown(key, 80)} is an array of type {etype}")
            self.room_for(n, etype, shown(key, 80))
            if key in SKIP_ARRAYS and etype in _SCALARS:
                self.take(n * struct.calcsize(_SCALARS[etype]))
                return Skipped(etype, n)
            if key in SKIP_ARRAYS:
                for _ in range(n):
                    self.take(self.unpack("<Q"))
                return Skipped(etype, n)
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
        # Each key takes at least 13 bytes (length, type, a one-byte value), each tensor 24.
        if n_tensors > 1 << 20 or n_kv > 1 << 20 or 13 * n_kv + 24 * n_tensors > size:
            raise ModelFileError(f"truncated or corrupt GGUF header: {n_kv:,} keys and {n_tensors:,} tensors cannot fit in {size:,} bytes")
        kv = Metadata()
        for _ in range(n_kv):
            key = c.string(MAX_KEY, "key")
            if key in kv:
                raise ModelFileError(f"corrupt GGUF header: key {shown(key, 80)} is there twice")
            vtype = c.unpack("<I")
            etype = struct.unpack_from("<I", buf, c.pos)[0] if vtype == ARRAY and c.pos + 4 <= size else None
            kv[key] = c.value(vtype, key)
            kv.types[key] = (vtype, etype)
        raw = []
        for _ in range(n_tensors):
            name = c.string(MAX_NAME, "tensor name")
            n_dims = c.unpack("<I")
            if not 1 <= n_dims <= 4:
                raise ModelFileError(f"corrupt GGUF header: tensor {shown(name)} has {n_dims} dimensions")
            shape = tuple(c.unpack("<Q") for _ in range(n_dims))
            ttype, offset = c.unpack("<I"), c.unpack("<Q")
            raw.append((name, shape, ttype, offset))
        align = _alignment(kv.get("general.alignment", 32))
        data_start = -(-c.pos // align) * align
    return kv, _tensors(raw, part, data_start, align, size)


def _alignment(value) -> int:
    # At least 32: llama.cpp maps tensor data in place and aborts on data less aligned than that.
    if not isinstance(value, int) or isinstance(value, bool) or not 32 <= value <= MAX_ALIGNMENT or value & (value - 1):
        raise ModelFileError(f"general.alignment is {shown(value, 40)}: not a power of two from 32 to {MAX_ALIGNMENT:,}")
    return value


def _tensors(raw: list, part: int, data_start: int, align: int, size: int) -> list[TensorEntry]:
    """The tensor table checked as llama.cpp's gguf reader checks it: known types, whole blocks per row,
    unique names, and each tensor's data where the previous one's (padded) ends, within the file."""
    tensors, names, expected = [], set(), 0
    for name, shape, ttype, offset in raw:
        try:
            t = GGMLQuantizationType(ttype)
            block, type_size = GGML_QUANT_SIZES[t]
        except (ValueError, KeyError):
            raise ModelFileError(f"tensor {shown(name)} has unknown type {ttype}") from None
        if name in names:
            raise ModelFileError(f"tensor {shown(name)} is there twice")
        names.add(name)
        n = 1
        for d in shape:
            n *= d
        if not n or n > size * 256 or shape[0] % block:  # 256: the most elements a byte holds (1-bit types, sparse)
            raise ModelFileError(f"tensor {shown(name)} has shape {list(shape)}, impossible for type {t.name}")
        nbytes = n // block * type_size
        if offset != expected:
            raise ModelFileError(f"damaged GGUF tensor table: tensor {shown(name)}'s data is at offset {offset:,}, "
                                 f"where the tensors before it end at {expected:,}")
        expected += -(-nbytes // align) * align
        entry = TensorEntry(name, shape, t, part, data_start + offset, nbytes)
        if entry.offset + nbytes > size:
            raise ModelFileError(f"truncated GGUF file (tensor {shown(name)} ends past the end of the file)")
        tensors.append(entry)
    return tensors


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
        return _checked(ModelFile(path, (path,), kv, tuple(tensors)))

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
    return _checked(ModelFile(path, tuple(parts), kv, tuple(tensors)))


def _checked(mf: ModelFile) -> ModelFile:
    try:
        check(mf.kv, mf.tensors)
    except ModelFileError as e:
        raise ModelFileError(f"{mf.path}: {e}") from None
    return mf
