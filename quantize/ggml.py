"""llama.cpp's own quantization kernels, called through ctypes from the libggml that llama-cpp-python
ships. `ggml_quantize_chunk` works row by row and holds no Python state, so threads can quantize
disjoint row ranges of one tensor at once (ctypes releases the GIL during the call).
Checked: per-tensor calls reproduce llama-quantize's output byte for byte (see tests)."""

from __future__ import annotations

import ctypes
import os
from functools import cache

import numpy as np

from .errors import QuantizeError
from .recipe import block_size, row_bytes


@cache
def lib() -> ctypes.CDLL:
    try:
        from llama_cpp import _ggml  # loads libggml and, through it, libggml-base
    except Exception as e:  # noqa: BLE001 - an error here means a broken llama-cpp-python install
        raise QuantizeError(f"cannot load llama.cpp's libggml from llama-cpp-python: {e}") from None
    g = _ggml.libggml
    g.ggml_quantize_chunk.argtypes = [
        ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
    ]
    g.ggml_quantize_chunk.restype = ctypes.c_size_t
    g.ggml_quantize_init.argtypes = [ctypes.c_int]
    g.ggml_quantize_init.restype = None
    g.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    g.ggml_row_size.restype = ctypes.c_size_t
    g.ggml_validate_row_data.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t]
    g.ggml_validate_row_data.restype = ctypes.c_bool
    return g


@cache
def _init(ggml_type: int) -> None:
    lib().ggml_quantize_init(ggml_type)


def default_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def quantize_rows(ggml_type: int, rows: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
    """Quantize a C-contiguous float32 [n_rows, n_per_row] array to `ggml_type` with llama.cpp's kernel
    (which also does F16 and BF16 with llama.cpp's rounding); returns the bytes as a uint8 array.
    `imatrix`: float32 [n_per_row], the importance of each column for these rows (one expert's weights,
    as llama-quantize passes them: llama-quant.cpp llama_tensor_quantize_impl); the kernels of types
    that use no importance ignore it."""
    assert rows.dtype == np.float32 and rows.flags.c_contiguous and rows.ndim == 2
    n_rows, n_per_row = rows.shape
    if imatrix is not None:
        assert imatrix.dtype == np.float32 and imatrix.flags.c_contiguous and imatrix.shape == (n_per_row,)
    if n_per_row % block_size(ggml_type):  # the kernel would write past the buffer
        raise QuantizeError(f"internal error: row length {n_per_row} does not fit ggml type {ggml_type}")
    rb = row_bytes(ggml_type, n_per_row)
    out = np.empty(rb * n_rows, dtype=np.uint8)
    g = lib()
    _init(ggml_type)
    im = None if imatrix is None else imatrix.ctypes.data
    written = g.ggml_quantize_chunk(ggml_type, rows.ctypes.data, out.ctypes.data, 0, n_rows, n_per_row, im)
    if written != out.nbytes or g.ggml_row_size(ggml_type, n_per_row) != rb:
        raise QuantizeError(f"internal error: llama.cpp wrote {written} bytes, expected {out.nbytes}")
    if not g.ggml_validate_row_data(ggml_type, out.ctypes.data, out.nbytes):
        raise QuantizeError("llama.cpp rejected the quantized data (non-finite weights in the checkpoint?)")
    return out
