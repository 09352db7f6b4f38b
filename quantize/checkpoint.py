"""Reading a Hugging Face checkpoint folder: config.json and safetensors shards, memory-mapped.

Every header is parsed and checked before any work starts, so a missing shard, a truncated file or
an unsupported dtype is reported in one line instead of failing halfway through a long conversion.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import QuantizeError, shown

# safetensors dtypes we read -> bytes per element
DTYPES = {"BF16": 2, "F16": 2, "F32": 4}

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
MAX_HEADER = 100 * 1024 * 1024  # the safetensors format's own limit
MAX_DIMS = 8  # weights have 1 to 3; a product of a million huge dimensions would take minutes


@dataclass
class TensorRef:
    name: str
    file: SafetensorsFile
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute byte offsets in the file
    end: int

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)  # exact: np.prod would wrap around on a hostile shape


def _whole(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _entry(path: Path, f: SafetensorsFile, name: str, info: object, start: int, size: int) -> TensorRef:
    """One header entry, every field typed and every byte inside the file before anything is mapped."""
    where = f"{path.name}: corrupt safetensors header: tensor {shown(name)}"
    if not isinstance(info, dict):
        raise QuantizeError(f"{where} is {shown(info)}, not an object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(shape, list) or len(shape) > MAX_DIMS or not all(_whole(d) and d >= 0 for d in shape):
        raise QuantizeError(f"{where} has shape {shown(shape)}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_whole(o) for o in offsets)) or not 0 <= offsets[0] <= offsets[1]:
        raise QuantizeError(f"{where} has data_offsets {shown(offsets)}")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise QuantizeError(f"{path.name}: tensor {shown(name)} has unsupported dtype {shown(dtype)} (supported: BF16, F16, F32)")
    ref = TensorRef(name, f, dtype, tuple(shape), start + offsets[0], start + offsets[1])
    if ref.end - ref.begin != ref.n_elements * DTYPES[dtype]:
        raise QuantizeError(f"{where} has wrong byte range: shape {shown(shape)} of {dtype} is "
                            f"{ref.n_elements * DTYPES[dtype]} bytes, data_offsets give {ref.end - ref.begin}")
    if ref.end > size:
        raise QuantizeError(f"{path.name}: truncated safetensors file ({shown(name)} ends at byte {ref.end}, file has {size})")
    return ref


@dataclass
class SafetensorsFile:
    path: Path
    tensors: dict[str, TensorRef] = field(default_factory=dict)
    _map: mmap.mmap | None = None

    @classmethod
    def open(cls, path: Path) -> SafetensorsFile:
        try:
            return cls._open(path)
        except OSError as e:
            raise QuantizeError(f"{path.name} cannot be read: {e.strerror or e}") from None

    @classmethod
    def _open(cls, path: Path) -> SafetensorsFile:
        f = cls(path)
        size = path.stat().st_size
        with open(path, "rb") as fh:
            raw = fh.read(8)
            if len(raw) < 8:
                raise QuantizeError(f"{path.name}: truncated safetensors file (no header)")
            (n,) = struct.unpack("<Q", raw)
            if n > MAX_HEADER or 8 + n > size:
                raise QuantizeError(f"{path.name}: corrupt safetensors header (header length {n}, file size {size})")
            try:
                header = json.loads(fh.read(n))
            except (UnicodeDecodeError, ValueError, RecursionError):
                raise QuantizeError(f"{path.name}: corrupt safetensors header (not JSON)") from None
        if not isinstance(header, dict):
            raise QuantizeError(f"{path.name}: corrupt safetensors header (not a JSON object)")
        start = 8 + n
        for name, info in header.items():
            if name != "__metadata__":
                f.tensors[name] = _entry(path, f, name, info, start, size)
        return f

    def _mapped(self) -> mmap.mmap:
        if self._map is None:
            with open(self.path, "rb") as fh:
                self._map = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        return self._map

    def raw(self, ref: TensorRef) -> np.ndarray:
        """The tensor's bytes as a read-only array of its own dtype (bf16 as uint16), no copy."""
        dt = {"BF16": np.uint16, "F16": np.float16, "F32": np.float32}[ref.dtype]
        return np.frombuffer(self._mapped(), dtype=dt, count=ref.n_elements, offset=ref.begin).reshape(ref.shape)

    def sampled(self, on: bool) -> None:
        """Reading scattered rows (quantize.sensitivity's samples): without this the kernel reads ahead up to
        read_ahead_kb (8 MiB on some disks) around every row touched, hundreds of GB for a Mixtral's samples."""
        try:
            self._mapped().madvise(mmap.MADV_RANDOM if on else mmap.MADV_NORMAL)
        except (AttributeError, OSError, ValueError):  # no madvise here: reads ahead as before
            pass

    def release(self, begin: int, end: int) -> None:
        """Drop the pages of bytes [begin, end) from our resident set, so that memory stays flat while
        a shard is read through (the page cache may keep them; they just stop counting as ours). A page
        shared with the next block is dropped too: touching it again costs a minor fault, no I/O."""
        if self._map is None or end <= begin:
            return
        lo = begin // mmap.PAGESIZE * mmap.PAGESIZE
        try:
            self._map.madvise(mmap.MADV_DONTNEED, lo, end - lo)
        except (AttributeError, OSError, ValueError):  # no madvise on this platform: only memory use grows
            pass

    def close(self) -> None:
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:  # an array still views it; the OS unmaps it at exit
                pass
            self._map = None


def to_f32(ref: TensorRef, data: np.ndarray) -> np.ndarray:
    """Exact conversion of bf16/f16/f32 values to a new float32 array (bf16 is the top half of an f32)."""
    out = np.empty(data.shape, dtype=np.float32)
    if ref.dtype == "BF16":
        u = out.view(np.uint32)
        u[...] = data
        u <<= 16
    else:
        out[...] = data
    return out


@dataclass
class Checkpoint:
    folder: Path
    config: dict
    tensors: dict[str, TensorRef]
    files: list[SafetensorsFile]

    def close(self) -> None:
        for f in self.files:
            f.close()


def read_json(path: Path, *, required: bool = True) -> dict | None:
    """A JSON object from a file, or one line naming the file; None when it is absent and not required."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except FileNotFoundError:
        if not required:
            return None
        raise QuantizeError(f"{path.name} not found in {path.parent}") from None
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise QuantizeError(f"{path.name} is not valid JSON: {shown(str(e), 120)}") from None
    except RecursionError:
        raise QuantizeError(f"{path.name} is not valid JSON: nested too deeply") from None
    except OSError as e:
        raise QuantizeError(f"{path.name} cannot be read: {e.strerror or e}") from None
    if not isinstance(data, dict):
        raise QuantizeError(f"{path.name} is not a JSON object (it holds {json_kind(data)})")
    return data


def json_kind(value: object) -> str:
    kinds = {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list", dict: "an object"}
    return "null" if value is None else kinds.get(type(value), type(value).__name__)


def _weight_map(folder: Path) -> dict[str, str]:
    weight_map = read_json(folder / INDEX_FILE).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise QuantizeError(f"{INDEX_FILE} has no weight_map")
    for name, shard in weight_map.items():
        # A shard is a file in the folder: never a path that leads elsewhere ("../x", "/dev/zero").
        if not isinstance(shard, str) or not shard or shard != Path(shard).name or shard.startswith("."):
            raise QuantizeError(f"{INDEX_FILE} names {shown(shard)} as the shard of {shown(name)}, not a file name")
    return weight_map


def open_checkpoint(folder: Path) -> Checkpoint:
    if not folder.is_dir():
        raise QuantizeError(f"{folder} is not a folder")
    config = read_json(folder / "config.json")
    if (folder / INDEX_FILE).exists():
        weight_map = _weight_map(folder)
        shard_names = sorted(set(weight_map.values()))
    elif (folder / SINGLE_FILE).is_file():
        weight_map, shard_names = None, [SINGLE_FILE]
    else:
        raise QuantizeError(f"no {INDEX_FILE} or {SINGLE_FILE} in {folder}")
    files = []
    for shard in shard_names:
        p = folder / shard
        if not p.is_file():
            raise QuantizeError(f"shard {shown(shard)} named in {INDEX_FILE} is missing from {folder}")
        files.append(SafetensorsFile.open(p))
    tensors: dict[str, TensorRef] = {}
    for f in files:
        for name, ref in f.tensors.items():
            if name in tensors:
                raise QuantizeError(f"tensor {shown(name)} is in two shards, {tensors[name].file.path.name} and {f.path.name}")
            tensors[name] = ref
    if weight_map is not None:
        for name, shard in weight_map.items():
            if name not in tensors or tensors[name].file.path.name != shard:
                raise QuantizeError(f"tensor {shown(name)} is not in shard {shard} as {INDEX_FILE} says")
    return Checkpoint(folder, config, tensors, files)


def disk_free(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize
