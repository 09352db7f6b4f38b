"""Importance matrices as llama.cpp keeps them: read (its GGUF format, what `llama-imatrix` writes and
GGUF repositories publish, or the older `.dat` format) and written (the GGUF format), and turned into
the per-column weights llama-quantize hands its kernels.

GGUF format (tools/imatrix/imatrix.cpp save_imatrix, common/imatrix-loader.cpp): metadata
`general.type` = "imatrix", `imatrix.datasets` (strings), `imatrix.chunk_count`, `imatrix.chunk_size`
(u32); per matrix NAME two F32 tensors: `NAME.in_sum2` [n_mat rows of n_per_row] (sum over tokens of x_j^2,
per expert for stacked expert tensors) and `NAME.counts` [n_mat rows of 1] (tokens that reached each).
Legacy `.dat` (save_imatrix_legacy): int32 n_entries, then per entry int32 name length, name, int32 ncall,
int32 nval, nval float32 (already means times ncall); then optionally int32 chunk count, int32 length and
the dataset name.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import QuantizeError, shown

IN_SUM2, COUNTS = ".in_sum2", ".counts"
KEY_DATASETS, KEY_CHUNK_COUNT, KEY_CHUNK_SIZE = "imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size"
MAX_NAME = 1 << 16  # a tensor name longer than this is a damaged file, not a model


@dataclass
class Entry:
    """One matrix, or one stacked expert tensor."""

    sums: np.ndarray  # float32 [n_mat, n_per_row]: sum over tokens of x_j^2 (n_mat = experts, or 1)
    counts: np.ndarray  # int64 [n_mat]: tokens that reached each matrix (per expert)


@dataclass
class Imatrix:
    entries: dict[str, Entry]  # by GGUF tensor name, e.g. "blk.0.ffn_up_exps.weight"
    chunk_count: int = 0
    chunk_size: int = 0
    datasets: list[str] = field(default_factory=list)
    source: str = ""  # the file it was read from, or "auto" (for quantize.imatrix.file)
    legacy: bool = False  # read from a .dat file: one row of nval means times ncall, counts = [ncall]
    routing_tokens: int = 0  # an imatrix file carries no routing counts

    def weights(self, name: str) -> np.ndarray | None:
        """float32 [n_mat, n_per_row], exactly as llama-quantize's load_imatrix computes them: sums over
        counts per expert, 1.0 for an expert no token reached; legacy: sums / ncall (as read when ncall
        is 0). A legacy entry is one row of n_mat * n_per_row (the file does not say n_mat)."""
        e = self.entries.get(name)
        if e is None:
            return None
        if self.legacy:
            ncall = int(e.counts[0])
            return e.sums / np.float32(ncall) if ncall > 0 else e.sums.copy()
        counts = e.counts.astype(np.float32)[:, None]  # llama.cpp divides by (float) count
        fired = counts > 0
        return np.where(fired, e.sums / np.where(fired, counts, np.float32(1)), np.float32(1)).astype(np.float32)

    def routing_shape(self) -> tuple[int, int] | None:
        return None

    def routing(self) -> np.ndarray:
        raise QuantizeError("internal error: an imatrix file has no routing counts")

    @property
    def entries_count(self) -> int:
        return len(self.entries)


def read_imatrix(path: Path) -> Imatrix:
    """An imatrix file in llama.cpp's GGUF format or its legacy .dat format (told apart by the GGUF
    magic, as llama.cpp tries GGUF first). Anything damaged is a QuantizeError of one line."""
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise QuantizeError(f"cannot read imatrix {shown(str(path), 200)}: {e.strerror or e}") from None
    if magic == b"GGUF":
        im = _read_gguf(path)
    else:
        im = _read_legacy(path)
    im.source = str(path)
    _check(im, path)
    return im


def _bad(path: Path, why: str) -> QuantizeError:
    return QuantizeError(f"{shown(str(path), 200)} is not a usable imatrix file: {why}")


def _read_gguf(path: Path) -> Imatrix:
    import gguf

    try:
        r = gguf.GGUFReader(path)
        fields = {k: f for k, f in r.fields.items()}
    except Exception as e:  # noqa: BLE001 - gguf-py raises many kinds on a damaged file
        raise _bad(path, f"damaged GGUF ({shown(str(e), 120)})") from None
    # The metadata first: a model file is told so before any of its (large) tensor data is read.
    if not all(k in fields for k in (KEY_DATASETS, KEY_CHUNK_COUNT, KEY_CHUNK_SIZE)):
        raise _bad(path, "no imatrix metadata (imatrix.datasets, imatrix.chunk_count, imatrix.chunk_size); is it a model?")
    try:
        tensors = [(t.name, t.tensor_type, [int(d) for d in t.shape], np.array(t.data, copy=True)) for t in r.tensors]
        # F32 data holds one value per element (other types are refused below, by name)
        if any(ttype == gguf.GGMLQuantizationType.F32 and data.size != int(np.prod(shape)) for _, ttype, shape, data in tensors):
            raise ValueError("tensor data cut short")
        del r  # the memory map goes with the reader
    except Exception as e:  # noqa: BLE001 - gguf-py raises many kinds on a damaged file
        raise _bad(path, f"damaged GGUF ({shown(str(e), 120)})") from None
    names = fields[KEY_DATASETS].contents()  # llama.cpp ignores anything but an array of strings here
    datasets = [d for d in names if isinstance(d, str)] if isinstance(names, list) else []
    counts = [fields[k].contents() for k in (KEY_CHUNK_COUNT, KEY_CHUNK_SIZE)]
    if not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**32 for v in counts):
        raise _bad(path, "imatrix.chunk_count and imatrix.chunk_size must be unsigned integers")
    chunk_count, chunk_size = counts

    pairs: dict[str, dict[str, tuple]] = {}
    for name, ttype, shape, data in tensors:
        for suffix in (IN_SUM2, COUNTS):
            if name.endswith(suffix) and len(name) > len(suffix):
                pairs.setdefault(name[: -len(suffix)], {})[suffix] = (ttype, shape, data)
    entries: dict[str, Entry] = {}
    for name, p in sorted(pairs.items()):
        if len(p) != 2:
            raise _bad(path, f"{shown(name)} has {'sums' if IN_SUM2 in p else 'counts'} but no {'counts' if IN_SUM2 in p else 'sums'}")
        (st, _, sdata), (ct, _, cdata) = p[IN_SUM2], p[COUNTS]  # llama.cpp goes by element counts only
        if st != gguf.GGMLQuantizationType.F32 or ct != gguf.GGMLQuantizationType.F32:
            raise _bad(path, f"sums and counts of {shown(name)} must be F32")
        sums, counts = sdata.reshape(-1).view(np.float32), cdata.reshape(-1).view(np.float32)
        n_mat = counts.size
        if n_mat < 1 or sums.size == 0 or sums.size % n_mat:
            raise _bad(path, f"{shown(name)}: {sums.size} sums do not fit {n_mat} counts")
        if not np.isfinite(counts).all() or (counts < 0).any():
            raise _bad(path, f"{shown(name)}: counts must be finite and not negative")
        if (counts >= 2.0**62).any():
            raise _bad(path, f"{shown(name)}: counts out of range")
        # llama.cpp rounds the float counts (std::lround: halves away from zero)
        rounded = np.floor(counts.astype(np.float64) + 0.5).astype(np.int64)
        entries[name] = Entry(sums.reshape(n_mat, -1).copy(), rounded)
    return Imatrix(entries, chunk_count, chunk_size, datasets)


class _Cursor:
    def __init__(self, data: bytes, path: Path):
        self.data, self.pos, self.path = data, 0, path

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise _bad(self.path, f"truncated ({what} at byte {self.pos})")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def i32(self, what: str) -> int:
        return struct.unpack("<i", self.take(4, what))[0]

    @property
    def left(self) -> int:
        return len(self.data) - self.pos


def _read_legacy(path: Path) -> Imatrix:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise QuantizeError(f"cannot read imatrix {shown(str(path), 200)}: {e.strerror or e}") from None
    c = _Cursor(data, path)
    if len(data) < 4:
        raise _bad(path, "neither GGUF nor the legacy .dat format (too short)")
    n_entries = c.i32("entry count")
    if n_entries < 1 or n_entries > len(data) // 12:  # each entry takes at least 12 bytes
        raise _bad(path, f"neither GGUF nor the legacy .dat format (entry count {n_entries})")
    entries: dict[str, Entry] = {}
    for i in range(n_entries):
        n = c.i32("name length")
        if not 0 < n <= MAX_NAME:
            raise _bad(path, f"entry {i + 1}: name length {n}")
        raw = c.take(n, "name")
        name = raw.split(b"\0", 1)[0].decode("utf-8", errors="replace")  # read as a C string, as llama.cpp does
        ncall, nval = c.i32("ncall"), c.i32("value count")
        if nval < 1 or nval * 4 > c.left:
            raise _bad(path, f"entry {shown(name)}: {nval} values" + (" (truncated)" if nval >= 1 else ""))
        if ncall < 0:
            raise _bad(path, f"entry {shown(name)}: negative call count {ncall}")
        sums = np.frombuffer(c.take(nval * 4, "values"), dtype="<f4").astype(np.float32).reshape(1, nval)
        entries[name] = Entry(sums, np.array([ncall], dtype=np.int64))
    chunk_count, datasets = 0, []
    if c.left >= 4:  # optional trailer: chunk count and dataset name
        chunk_count = max(0, c.i32("chunk count"))
        if c.left >= 4:
            n = c.i32("dataset length")
            if 0 < n <= c.left:
                datasets = [c.take(n, "dataset").split(b"\0", 1)[0].decode("utf-8", errors="replace")]
    return Imatrix(entries, chunk_count, 0, datasets, legacy=True)


def _check(im: Imatrix, path: Path) -> None:
    """What llama-quantize refuses (non-finite values), and values no computation could produce."""
    if not im.entries:
        raise _bad(path, "no entries")
    for name, e in im.entries.items():
        if not np.isfinite(e.sums).all():
            raise _bad(path, f"{shown(name)} holds NaN or infinite values")
        if (e.sums < 0).any():
            raise _bad(path, f"{shown(name)} holds negative sums of squares")


def write_imatrix(im: Imatrix, path: Path) -> None:
    """`im` in llama.cpp's GGUF imatrix format (as llama-imatrix writes it: entries sorted by name), via a
    temporary file beside `path` renamed into place."""
    import gguf

    if im.legacy:
        raise QuantizeError("internal error: a legacy imatrix has no per-expert sums to write")
    w = gguf.GGUFWriter(path=None, arch="")
    w.kv_data[0].clear()  # llama-imatrix writes no general.architecture
    w.add_string("general.type", "imatrix")
    # gguf-py cannot write an empty array, and llama-quantize refuses a file without this key
    w.add_array(KEY_DATASETS, list(im.datasets) or ["unknown"])
    w.add_uint32(KEY_CHUNK_COUNT, im.chunk_count)
    w.add_uint32(KEY_CHUNK_SIZE, im.chunk_size)
    for name in sorted(im.entries):
        e = im.entries[name]
        n_mat = len(e.counts)  # ggml drops trailing dimensions of 1: one matrix is a 1-d tensor
        sums = np.ascontiguousarray(e.sums, dtype=np.float32).reshape((n_mat, -1) if n_mat > 1 else (-1,))
        w.add_tensor(name + IN_SUM2, sums)
        w.add_tensor(name + COUNTS, np.asarray(e.counts, dtype=np.float32).reshape((n_mat, 1) if n_mat > 1 else (1,)))
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        w.write_header_to_file(path=tmp)
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, path)
    except OSError as e:
        raise QuantizeError(f"cannot write {shown(str(path), 200)}: {e.strerror or e}") from None
    finally:
        tmp.unlink(missing_ok=True)
