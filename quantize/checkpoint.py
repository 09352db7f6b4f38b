"""Reading a Hugging Face checkpoint folder: config.json and safetensors shards, memory-mapped.

Every header is parsed and checked before any work starts, so a missing shard, a truncated file or
an unsupported dtype is reported in one line instead of failing halfway through a long conversion.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import QuantizeError

# safetensors dtypes we read -> bytes per element
DTYPES = {"BF16": 2, "F16": 2, "F32": 4}

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
MAX_HEADER = 100 * 1024 * 1024  # the safetensors format's own limit


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
        return int(np.prod(self.shape)) if self.shape else 1


@dataclass
class SafetensorsFile:
    path: Path
    tensors: dict[str, TensorRef] = field(default_factory=dict)
    _map: mmap.mmap | None = None

    @classmethod
    def open(cls, path: Path) -> SafetensorsFile:
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
            except (UnicodeDecodeError, json.JSONDecodeError):
                raise QuantizeError(f"{path.name}: corrupt safetensors header (not JSON)") from None
        if not isinstance(header, dict):
            raise QuantizeError(f"{path.name}: corrupt safetensors header")
        start = 8 + n
        for name, info in header.items():
            if name == "__metadata__":
                continue
            try:
                dtype, shape, (b, e) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise QuantizeError(f"{path.name}: corrupt safetensors header entry for {name}") from None
            if dtype not in DTYPES:
                raise QuantizeError(f"{path.name}: tensor {name} has unsupported dtype {dtype} (supported: BF16, F16, F32)")
            ref = TensorRef(name, f, dtype, shape, start + b, start + e)
            if ref.end - ref.begin != ref.n_elements * DTYPES[dtype] or ref.begin < start:
                raise QuantizeError(f"{path.name}: corrupt safetensors header: {name} has wrong byte range")
            if ref.end > size:
                raise QuantizeError(f"{path.name}: truncated safetensors file ({name} ends at byte {ref.end}, file has {size})")
            f.tensors[name] = ref
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


def read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except FileNotFoundError:
        raise QuantizeError(f"{path.name} not found in {path.parent}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise QuantizeError(f"{path.name} is not valid JSON: {e}") from None


def open_checkpoint(folder: Path) -> Checkpoint:
    if not folder.is_dir():
        raise QuantizeError(f"{folder} is not a folder")
    config = read_json(folder / "config.json")
    index = folder / INDEX_FILE
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise QuantizeError(f"{INDEX_FILE} has no weight_map")
        shard_names = sorted(set(weight_map.values()))
    elif (folder / SINGLE_FILE).is_file():
        weight_map, shard_names = None, [SINGLE_FILE]
    else:
        raise QuantizeError(f"no {INDEX_FILE} or {SINGLE_FILE} in {folder}")
    files = []
    for shard in shard_names:
        p = folder / shard
        if not p.is_file():
            raise QuantizeError(f"shard {shard} named in {INDEX_FILE} is missing from {folder}")
        files.append(SafetensorsFile.open(p))
    tensors: dict[str, TensorRef] = {}
    for f in files:
        tensors.update(f.tensors)
    if weight_map is not None:
        for name, shard in weight_map.items():
            if name not in tensors or tensors[name].file.path.name != shard:
                raise QuantizeError(f"tensor {name} is not in shard {shard} as {INDEX_FILE} says")
    return Checkpoint(folder, config, tensors, files)


def disk_free(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize
