"""One streaming pass from a Hugging Face checkpoint folder to a GGUF file.

read (checkpoint.py) -> plan every output tensor: name, shape, type (mapping.py, recipe.py)
-> write the header (metadata.py, vocab.py) -> stream each tensor in row blocks: bf16/f16/f32 to f32,
q/k RoPE permutation, llama.cpp's kernel (ggml.py) -> rename the finished file into place.

With an importance matrix (an `Importance`: an imatrix file, or the calibration computing one layer by
layer as the pass reaches it), each quantized tensor's weights are asked for just before its first block
and each expert's rows go to the kernel with that expert's row of weights, as llama-quantize does.
Routing statistics the importance gathers are reserved as the header's last key and patched after the pass.

Memory: the weights are memory-mapped and processed in blocks of BLOCK_ELEMENTS weights; each block's
source pages leave our resident set once it is encoded, and at most 2 blocks per thread are in flight.
Peak RSS is therefore the program and its tokenizer tables plus about 2 x threads x (1 MiB of float32,
its source and its output), whatever the model size: an expert matrix is never whole in memory (one of
Mixtral 8x7B's is 224 MiB in float32). Measured: 130 MiB converting a Mixtral-8x7B-shaped layer.
Importance weights add one tensor's worth of column weights (n_expert x row length: 448 KiB for
Mixtral 8x7B's ffn_down_exps); the calibration's own memory is quantize/calibrate.py's.
"""

from __future__ import annotations

import errno
import os
import resource
import signal
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import gguf
import numpy as np
from gguf import GGMLQuantizationType as T

from . import __version__
from .checkpoint import Checkpoint, TensorRef, disk_free, open_checkpoint, to_f32
from .errors import QuantizeError, shown
from .ggml import default_threads, quantize_rows
from .imatrix import Imatrix
from .layout import check_layout
from .mapping import gguf_order, map_name
from .metadata import HParams, add_hparams, llama3_rope_freqs, read_hparams
from .partials import Removed, locked, partial_path, remove_stale_partials
from .recipe import OUT_TYPES, ModelShape, allows_quantization, block_size, requires_imatrix, row_bytes, tensor_type
from .vocab import load_vocab

BLOCK_ELEMENTS = 1 << 18  # weights handed to one kernel call: 1 MiB of float32
MAX_THREADS = 512  # GGML_MAX_N_THREADS, as the CLI's --threads
ALIGNMENT = gguf.GGUF_DEFAULT_ALIGNMENT
STORED = {"BF16": T.BF16, "F16": T.F16, "F32": T.F32}
KV_ROUTING_TOKENS, KV_ROUTING_COUNTS = "localmix.routing.tokens", "localmix.routing.expert_counts"
# Types a per-tensor override (`types=`) may give a quantizable tensor: those llama.cpp's ggml_quantize_chunk
# writes and its loader reads (the ternary TQ types are for other architectures).
OVERRIDE_TYPES = frozenset((T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q2_K, T.Q3_K, T.Q4_K,
                            T.Q5_K, T.Q6_K, T.IQ1_S, T.IQ1_M, T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ3_XXS, T.IQ3_S,
                            T.IQ4_NL, T.IQ4_XS))


class Importance(Protocol):
    """Importance weights for the quantization kernels (quantize.imatrix.Imatrix, quantize.calibrate.Calibrator)."""

    source: str  # "auto" or the imatrix file, for quantize.imatrix.file
    routing_tokens: int  # tokens the routing counts are taken over (known before the pass)

    def weights(self, name: str) -> np.ndarray | None:
        """float32 [n_mat, n_per_row] (or n_mat * n_per_row values in any shape), or None: asked in file order
        just before tensor `name` is quantized, only for tensors that are."""

    def routing_shape(self) -> tuple[int, int] | None:
        """(n_layer, n_expert) when routing counts will be known after the pass."""

    def routing(self) -> np.ndarray:
        """uint64 [n_layer, n_expert]: how often each expert was chosen; asked after the last tensor."""


@dataclass
class OutTensor:
    name: str
    shape: tuple[int, ...]  # numpy order: (n_expert,) rows, row length
    type: T
    parts: list[TensorRef]  # one per expert for stacked tensors, else one
    permute: str | None = None  # "q"/"k": rows reordered for llama.cpp's RoPE
    stored: T = T.F32  # the type it has in a GGUF that keeps the checkpoint's (what llama-quantize reads)
    extra: np.ndarray | None = None  # a tensor we compute instead of read (rope_freqs)

    @property
    def ne0(self) -> int:
        return self.shape[-1]

    @property
    def nbytes(self) -> int:
        n_rows = int(np.prod(self.shape[:-1])) if len(self.shape) > 1 else 1
        return n_rows * row_bytes(self.type, self.ne0)

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape))

    @property
    def n_mat(self) -> int:  # experts of a stacked tensor, else 1
        return self.shape[0] if len(self.shape) == 3 else 1

    @property
    def converted(self) -> bool:  # llama-quantize's `quantize` (cur_type != new_type): the tensors it looks up weights for
        return bool(self.parts) and self.type != self.stored


@dataclass
class Summary:
    path: Path
    out_type: str
    file_bytes: int
    n_params: int
    seconds: float
    peak_rss: int
    types: Counter = field(default_factory=Counter)
    hparams: HParams | None = None
    importance_seconds: float = 0.0  # spent computing importance weights (the calibration, with --imatrix auto)
    with_importance: int = 0  # tensors quantized with importance weights

    @property
    def bits_per_weight(self) -> float:
        return self.file_bytes * 8 / max(1, self.n_params)


def plan_tensors(ck: Checkpoint, hp: HParams, out_type: str, has_imatrix: bool = False,
                 types: dict[str, T] | None = None) -> list[OutTensor]:
    """Every output tensor with its shape and type, in the order llama.cpp lists them (of a checkpoint
    `layout.check_layout` accepted). `types` overrides the recipe's type of quantizable tensors by name
    (a mixed-precision file: quantize.allocate's choice), checked by `override_types`."""
    grouped: dict[str, dict] = {}
    for ref in ck.tensors.values():
        try:
            m = map_name(ref.name)
        except KeyError:
            raise QuantizeError(f"unexpected tensor {shown(ref.name)} for {hp.arch}") from None
        if m is None:
            continue
        g = grouped.setdefault(m.gguf_name, {"parts": {}, "permute": m.permute})
        g["parts"][m.expert if m.expert is not None else -1] = ref

    tied = "output.weight" not in grouped
    shape = ModelShape(hp.n_layer, hp.n_expert, hp.n_head, hp.n_head_kv, tied)
    out: list[OutTensor] = []
    for name, g in grouped.items():
        parts = [g["parts"][k] for k in sorted(g["parts"])]
        first = parts[0]
        if any(p.shape != first.shape for p in parts):
            raise QuantizeError(f"experts of {name} have different shapes")
        if -1 not in g["parts"]:  # stacked experts
            if sorted(g["parts"]) != list(range(hp.n_expert)):
                raise QuantizeError(f"{name}: expected {hp.n_expert} experts, found {len(parts)}")
            tshape = (len(parts), *first.shape)
        else:
            tshape = first.shape
        stored = STORED[first.dtype] if len(tshape) >= 2 else T.F32
        if name.endswith("ffn_gate_inp.weight"):
            stored = T.F32  # routers stay F32, as llama.cpp writes them
        t = tensor_type(name, tshape[-1], len(tshape), stored, out_type, shape, has_imatrix)
        out.append(OutTensor(name, tuple(tshape), t, parts, g["permute"], stored))
    freqs = llama3_rope_freqs(hp)
    if freqs is not None:
        out.append(OutTensor("rope_freqs.weight", freqs.shape, T.F32, [], extra=freqs))
    out.sort(key=lambda t: gguf_order(t.name))
    return override_types(out, types, has_imatrix) if types else out


def override_types(tensors: list[OutTensor], types: dict[str, T], has_imatrix: bool) -> list[OutTensor]:
    """`tensors` with the types in `types` (by tensor name), each held to what llama.cpp accepts: a tensor
    llama-quantize would quantize, a type its kernels write whose block divides the row, and importance
    weights for the types that are garbage without them (tensor_requires_imatrix)."""
    by_name = {t.name: t for t in tensors}
    for name, want in types.items():
        t = by_name.get(name)
        if t is None:
            raise QuantizeError(f"type override for {shown(name)}: the model has no such tensor")
        if not t.parts or not allows_quantization(name, len(t.shape)):
            raise QuantizeError(f"type override for {name}: llama.cpp never quantizes this tensor (it stays {t.type.name})")
        try:
            want = T(want)
        except ValueError:
            raise QuantizeError(f"type override for {name}: {shown(str(want))} is not a ggml type") from None
        if want not in OVERRIDE_TYPES:
            raise QuantizeError(f"type override for {name}: {want.name} is not a type llama.cpp quantizes to")
        if t.ne0 % block_size(want):
            raise QuantizeError(f"type override for {name}: {want.name} needs rows of a multiple of {block_size(want)}, "
                                f"its rows have {t.ne0}")
        if not has_imatrix and requires_imatrix(name, want, ""):
            raise QuantizeError(f"type override for {name}: {want.name} needs an importance matrix (--imatrix auto or FILE)")
        t.type = want
    return tensors


@contextmanager
def planned(folder: Path, out_type: str, has_imatrix: bool = False,
            types: dict[str, T] | None = None) -> Iterator[tuple[Checkpoint, HParams, list[OutTensor]]]:
    """The checkpoint, its hyper-parameters and planned output tensors (checked as `convert` checks them), its
    files open while the block runs: what quantize.sensitivity reads the weights through."""
    if out_type not in OUT_TYPES:
        raise QuantizeError(f"unknown type {out_type} (choose from {', '.join(OUT_TYPES)})")
    ck = open_checkpoint(folder)
    try:
        hp = read_hparams(ck.config)
        check_layout(ck.tensors, hp)
        yield ck, hp, plan_tensors(ck, hp, out_type, has_imatrix, types)
    finally:
        ck.close()


def check_importance(tensors: list[OutTensor], out_type: str, importance: Importance | None) -> None:
    """What llama-quantize refuses, before a byte is written: a type whose tensors need an imatrix without
    one; and, for an imatrix file, an entry of another size than its tensor or a missing one for a tensor that
    needs it. (Weights computed as the pass goes are held to the same in `_importance_of`.)"""
    for t in tensors:
        needs = t.converted and requires_imatrix(t.name, t.type, out_type)
        if needs and importance is None:
            raise QuantizeError(
                f"{out_type} needs an importance matrix ({t.name} becomes {t.type.name}): use --imatrix auto or --imatrix FILE"
            )
        if not isinstance(importance, Imatrix) or not t.converted:
            continue
        e = importance.entries.get(t.name)
        if e is None and needs:
            raise QuantizeError(f"the imatrix has no entry for {t.name}, which {out_type} makes {t.type.name}: is it of another model?")
        if e is not None and e.sums.size != t.n_mat * t.ne0 and t.name != "token_embd.weight":
            raise _size_error(importance.source, e.sums.size, t)


def _size_error(source: str, size: int, t: OutTensor) -> QuantizeError:
    return QuantizeError(
        f"imatrix size {size} is different from tensor size {t.n_mat * t.ne0} for {t.name}: "
        f"{shown(os.path.basename(source) or source, 120)} is of another model"
    )


def _importance_of(t: OutTensor, importance: Importance | None, out_type: str) -> np.ndarray | None:
    """The tensor's weights as [n_mat, n_per_row], or None (quantized without): llama-quantize ignores a
    token_embd entry of the wrong size and refuses any other, and a missing one where the type needs it
    (the i-quant kernels abort without); non-finite weights are refused."""
    if importance is None or not t.converted:
        return None
    w = importance.weights(t.name)
    if w is None:
        if requires_imatrix(t.name, t.type, out_type):
            raise QuantizeError(f"no importance weights for {t.name}, which {out_type} makes {t.type.name}")
        return None
    w = np.asarray(w, dtype=np.float32)
    if w.size != t.n_mat * t.ne0:
        if t.name == "token_embd.weight":
            return None
        raise _size_error(importance.source, w.size, t)
    if not np.isfinite(w).all():
        raise QuantizeError(f"importance weights for {t.name} hold NaN or infinite values")
    return np.ascontiguousarray(w.reshape(t.n_mat, t.ne0))


def _row_order(t: OutTensor, hp: HParams, n_rows: int) -> np.ndarray | None:
    """llama.cpp's q/k layout: within each head, the two rotary halves are interleaved."""
    if t.permute is None:
        return None
    heads = hp.n_head if t.permute == "q" else hp.n_head_kv
    return np.arange(n_rows).reshape(heads, 2, n_rows // heads // 2).swapaxes(1, 2).reshape(-1)


class Encoder:
    """Turns an output tensor's source matrices into the bytes of its type, block of rows by block of
    rows, on a pool of threads (numpy's copies and llama.cpp's kernels both run without the GIL).
    Blocks flow through a bounded window that spans the parts of a stacked expert tensor, so every
    thread stays busy and memory stays flat."""

    def __init__(self, threads: int):
        self.window = threads * 2
        self.pool = ThreadPoolExecutor(threads)

    def close(self) -> None:
        self.pool.shutdown()

    def encode(self, t: OutTensor, order: np.ndarray | None, weights: np.ndarray | None = None) -> Iterator[np.ndarray]:
        """`weights`: [n_mat, n_per_row], row e for part (expert) e; blocks never span two parts."""
        inflight: deque = deque()
        for e, ref in enumerate(t.parts):
            im = None if weights is None else weights[e]
            raw = ref.file.raw(ref)
            rows = raw.reshape(-1, raw.shape[-1]) if raw.ndim > 1 else raw.reshape(1, -1)
            n_rows, row_nbytes = rows.shape[0], rows.shape[1] * rows.itemsize
            step = max(1, BLOCK_ELEMENTS // rows.shape[1])
            for r0 in range(0, n_rows, step):
                sel = slice(r0, min(r0 + step, n_rows))
                # The source pages a block read can leave our resident set once it is encoded; with
                # permuted rows (q/k) the whole matrix goes at its last block.
                if order is None:
                    done = (ref, ref.begin + r0 * row_nbytes, ref.begin + sel.stop * row_nbytes)
                else:
                    done = (ref, ref.begin, ref.end) if sel.stop == n_rows else None
                inflight.append((self.pool.submit(_encode_block, ref, rows, sel, order, t.type, im), done))
                if len(inflight) >= self.window:
                    yield _finish(inflight.popleft())
            del raw, rows
        while inflight:
            yield _finish(inflight.popleft())


def _finite(ref: TensorRef, src: np.ndarray) -> bool:
    """No NaN or infinity among the block's weights: a float64 sum is non-finite exactly when one is
    (it cannot overflow from float32 values); for bf16, the exponent bits of some value are all ones."""
    if ref.dtype == "BF16":
        return src.size == 0 or int(np.max(src & 0x7F80)) != 0x7F80
    return bool(np.isfinite(np.sum(src, dtype=np.float64)))


def _non_finite_error(ref: TensorRef, rows: np.ndarray, sel: slice, order: np.ndarray | None) -> QuantizeError:
    """Where the first NaN or infinity of a block is, as the checkpoint numbers rows (not our permuted order)."""
    src = to_f32(ref, rows[order[sel]] if order is not None else rows[sel])
    bad = int(np.argmax(~np.isfinite(src).all(axis=1)))
    row = int(order[sel][bad]) if order is not None else sel.start + bad
    where = f" (row {row})" if len(ref.shape) > 1 else ""
    return QuantizeError(f"tensor {shown(ref.name)} holds NaN or infinite values{where}: the checkpoint is damaged")


def _encode_block(ref: TensorRef, rows: np.ndarray, sel: slice, order: np.ndarray | None, out_type: T,
                  imatrix: np.ndarray | None = None) -> np.ndarray:
    src = rows[order[sel]] if order is not None else rows[sel]
    if not _finite(ref, src):  # llama.cpp would compute garbage with it, or refuse the file
        raise _non_finite_error(ref, rows, sel, order)
    if STORED[ref.dtype] == out_type:  # a copy, exact (bf16 to BF16, f32 norms)
        return np.ascontiguousarray(src).view(np.uint8).reshape(-1)
    f32 = to_f32(ref, src)
    if out_type == T.F32:
        return f32.view(np.uint8).reshape(-1)
    return quantize_rows(int(out_type), f32, imatrix)


def _finish(item) -> np.ndarray:
    future, done = item
    block = future.result()
    if done is not None:
        ref, lo, hi = done
        ref.file.release(lo, hi)
    return block


def _write_padding(fout, n: int) -> None:
    pad = -n % ALIGNMENT
    if pad:
        fout.write(b"\0" * pad)


def default_name(model_name: str, out_type: str) -> str:
    return f"{model_name.replace('/', '--')}-{out_type}.gguf"


def convert(
    folder: Path,
    out: Path,
    out_type: str = "Q4_K_M",
    *,
    force: bool = False,
    threads: int | None = None,
    source: dict | None = None,
    on_start: Callable[[int, int], None] | None = None,
    on_tensor: Callable[[str, int], None] | None = None,
    on_bytes: Callable[[int], None] | None = None,
    on_stale: Callable[[Removed], None] | None = None,
    importance: Importance | None = None,
    types: dict[str, T] | None = None,
    metadata: dict | None = None,
) -> Summary:
    """Convert the checkpoint in `folder` to `out`. `source` may carry `repo` and `revision` for the
    metadata. The callbacks report (number of tensors, total bytes), each finished tensor, bytes, and
    each partial file of an interrupted earlier run that was removed from the output folder.
    `importance`: weights for the kernels (an imatrix file, or the calibration), as llama-quantize's --imatrix.
    `types`: per-tensor types over the recipe's (see plan_tensors); `out_type` still names the recipe for the
    rest and general.file_type (for a mixed file the caller passes the uniform mix nearest its size).
    `metadata`: extra header keys (see `add_metadata`), written before the routing counts."""
    if out_type not in OUT_TYPES:
        raise QuantizeError(f"unknown type {out_type} (choose from {', '.join(OUT_TYPES)})")
    if threads is not None and not 1 <= threads <= MAX_THREADS:
        raise QuantizeError(f"--threads must be from 1 to {MAX_THREADS}, not {threads}")
    if out.is_dir():
        raise QuantizeError(f"{out} is a folder; the output must be a file name")
    if out.exists() and not force:
        raise QuantizeError(f"{out} already exists (use --force to overwrite)")
    if not out.parent.is_dir():
        raise QuantizeError(f"output folder {out.parent} does not exist")
    t0 = time.perf_counter()
    for removed in remove_stale_partials(out.parent):
        if on_stale:
            on_stale(removed)

    with planned(folder, out_type, importance is not None, types) as (_, hp, tensors):
        check_importance(tensors, out_type, importance)
        w = _header(folder, hp, tensors, out_type, source or {}, importance, metadata)
        routing = importance.routing_shape() if importance is not None else None
        data_bytes = sum(t.nbytes + (-t.nbytes % ALIGNMENT) for t in tensors)
        free = disk_free(out.parent)
        if free < data_bytes + (64 << 20):
            raise QuantizeError(
                f"not enough disk space in {out.parent}: need {data_bytes / 2**30:.2f} GiB, {free / 2**30:.2f} GiB free"
            )
        if on_start:
            on_start(len(tensors), data_bytes)
        encoder = Encoder(threads or default_threads())
        stats = _PassStats()
        try:
            with _written_atomically(out) as tmp:
                try:
                    w.write_header_to_file(path=tmp)
                    w.write_kv_data_to_file()
                    kv_end = w.fout[0].tell()  # the routing counts are the last bytes of the KV section
                    w.write_ti_data_to_file()
                    _write_tensors(w.fout[0], tensors, hp, encoder, on_bytes, on_tensor, importance, stats, out_type)
                    if routing is not None:
                        _patch_routing(w.fout[0], kv_end, routing, importance)
                finally:
                    w.close()
        finally:
            encoder.close()

    return Summary(
        path=out,
        out_type=out_type,
        file_bytes=out.stat().st_size,
        n_params=sum(t.n_elements for t in tensors),
        seconds=time.perf_counter() - t0,
        peak_rss=peak_rss(),
        types=Counter(t.type.name for t in tensors),
        hparams=hp,
        importance_seconds=stats.importance_seconds,
        with_importance=stats.with_importance,
    )


@dataclass
class _PassStats:
    importance_seconds: float = 0.0
    with_importance: int = 0


def _patch_routing(fout, kv_end: int, shape: tuple[int, int], importance: Importance) -> None:
    """The routing counts over the zeros reserved for them (the header's last value)."""
    counts = np.asarray(importance.routing())
    if counts.shape != tuple(shape) or counts.dtype.kind not in "ui" or (counts < 0).any():
        raise QuantizeError(f"internal error: routing counts of shape {counts.shape}, expected {tuple(shape)}")
    data = counts.astype("<u8").tobytes()
    end = fout.tell()
    fout.seek(kv_end - len(data))
    fout.write(data)
    fout.seek(end)
    fout.flush()
    os.fsync(fout.fileno())


def _header(folder: Path, hp: HParams, tensors: list[OutTensor], out_type: str, source: dict,
            importance: Importance | None = None, metadata: dict | None = None) -> gguf.GGUFWriter:
    """Everything before the tensor data: metadata, tokenizer, and the table of tensors."""
    w = gguf.GGUFWriter(path=None, arch="llama")
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name((source.get("repo") or folder.resolve().name).split("/")[-1])
    w.add_file_type(int(OUT_TYPES[out_type].ftype))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_quantized_by(f"localmix {__version__}")
    if source.get("repo"):
        w.add_string("general.source.huggingface.repository", source["repo"])
    if source.get("revision"):
        w.add_string("localmix.source.revision", source["revision"])
    w.add_string("localmix.version", __version__)
    add_hparams(w, hp)
    load_vocab(folder, hp.vocab_size).add_to(w)
    if metadata:
        add_metadata(w, metadata)
    if importance is not None:
        _add_importance(w, importance)
    for t in tensors:
        w.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.type)
    return w


def add_metadata(w: gguf.GGUFWriter, metadata: dict) -> None:
    """Extra keys, typed by their Python value: str, bool, float (float32), np.uint32 (uint32), other
    non-negative int (uint64). A key the header already has is refused rather than overwritten."""
    for key, value in metadata.items():
        if any(key in kv for kv in w.kv_data):
            raise QuantizeError(f"internal error: metadata key {shown(key)} is already in the header")
        if isinstance(value, str):
            w.add_string(key, value)
        elif isinstance(value, bool | np.bool_):
            w.add_bool(key, bool(value))
        elif isinstance(value, np.uint32):
            w.add_uint32(key, int(value))
        elif isinstance(value, int | np.integer) and value >= 0:
            w.add_uint64(key, int(value))
        elif isinstance(value, float | np.floating):
            w.add_float32(key, float(value))
        else:
            raise QuantizeError(f"internal error: metadata {shown(key)} has a value of type {type(value).__name__}")


def _add_importance(w: gguf.GGUFWriter, importance: Importance) -> None:
    """The keys llama-quantize writes for --imatrix (strings cut to 127 bytes as its kv overrides are), and
    zeros for the routing counts, last, to be patched after the pass."""
    w.add_string("quantize.imatrix.file", _cut(importance.source or "auto"))
    datasets = getattr(importance, "datasets", None) or []
    if datasets:
        w.add_string("quantize.imatrix.dataset", _cut(datasets[0]))
    entries = getattr(importance, "entries_count", None)
    if entries:
        w.add_uint32("quantize.imatrix.entries_count", int(entries))
    chunks = getattr(importance, "chunk_count", 0)
    if chunks and chunks > 0:
        w.add_uint32("quantize.imatrix.chunks_count", int(chunks))
    shape = importance.routing_shape()
    if shape is not None:
        w.add_uint64(KV_ROUTING_TOKENS, int(importance.routing_tokens))
        w.add_key_value(KV_ROUTING_COUNTS, [0] * (shape[0] * shape[1]), gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.UINT64)


def _cut(text: str, limit: int = 127) -> str:
    return text.encode("utf-8")[:limit].decode("utf-8", errors="ignore")


def _write_tensors(fout, tensors: list[OutTensor], hp: HParams, encoder: Encoder, on_bytes, on_tensor,
                   importance: Importance | None = None, stats: _PassStats | None = None, out_type: str = "") -> None:
    """The data section: each tensor aligned, streamed block by block in the planned order."""
    stats = stats or _PassStats()
    _write_padding(fout, fout.tell())
    for t in tensors:
        written = 0
        if t.extra is not None:
            fout.write(t.extra.tobytes())
            written = t.extra.nbytes
        order = _row_order(t, hp, t.parts[0].shape[0]) if t.parts else None
        t0 = time.perf_counter()
        weights = _importance_of(t, importance, out_type)
        stats.importance_seconds += time.perf_counter() - t0
        stats.with_importance += weights is not None
        for block in encoder.encode(t, order, weights):
            fout.write(block)
            written += block.nbytes
            if on_bytes:
                on_bytes(block.nbytes)
        if written != t.nbytes:
            raise QuantizeError(f"internal error: {t.name} wrote {written} bytes, planned {t.nbytes}")
        _write_padding(fout, written)
        if on_tensor:
            on_tensor(t.name, t.nbytes)
    fout.flush()
    os.fsync(fout.fileno())


@contextmanager
def _written_atomically(out: Path) -> Iterator[Path]:
    """Yields a temporary path beside `out`, renamed to `out` if the block completes. An error, Ctrl-C
    or SIGTERM removes it, so nothing half-written is ever left at `out`."""
    tmp = partial_path(out)
    old_term = signal.signal(signal.SIGTERM, _raise_interrupt) if _main_thread() else None
    try:
        with locked(tmp):  # a SIGKILL leaves the file; the lock tells the next run its writer is gone
            yield tmp
            os.replace(tmp, out)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise QuantizeError(f"disk full while writing {out}; nothing was left at {out}") from None
        raise QuantizeError(f"cannot write {out}: {e.strerror or e}") from None
    finally:
        tmp.unlink(missing_ok=True)
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)


def _main_thread() -> bool:  # signal handlers can only be set from the main thread
    return threading.current_thread() is threading.main_thread()


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def peak_rss() -> int:
    """Peak resident set size of this process, in bytes. Linux's VmHWM starts afresh at exec, while
    ru_maxrss carries the parent's peak over a fork+exec (a child of a big process would report it)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024  # macOS reports bytes, Linux KiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
