"""llama.cpp's own importance matrix of a GGUF, collected in this process through llama-cpp-python's eval
callback (`cb_eval` in llama_context_params) exactly as tools/imatrix/imatrix.cpp collects it: every
MUL_MAT whose weights are a `blk.*` tensor (inputs of at least 16 rows, F32), every MUL_MAT_ID per
expert over the tokens routed to it; text tokenized by llama.cpp with BOS, chunks of `chunk_size`
tokens each starting with BOS, all positions output (so that the last layer runs on every token).
No tool to build: the oracle for quantize.calibrate's torch imatrix."""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np

MAX_DIMS, MAX_SRC, MAX_NAME, MAX_OP_PARAMS = 4, 10, 64, 64


class GgmlTensor(ctypes.Structure):
    pass


GgmlTensor._fields_ = [  # ggml.h's struct ggml_tensor of the vendored llama.cpp
    ("type", ctypes.c_int),
    ("buffer", ctypes.c_void_p),
    ("ne", ctypes.c_int64 * MAX_DIMS),
    ("nb", ctypes.c_size_t * MAX_DIMS),
    ("op", ctypes.c_int),
    ("op_params", ctypes.c_int32 * (MAX_OP_PARAMS // 4)),
    ("flags", ctypes.c_int32),
    ("src", ctypes.POINTER(GgmlTensor) * MAX_SRC),
    ("view_src", ctypes.POINTER(GgmlTensor)),
    ("view_offs", ctypes.c_size_t),
    ("data", ctypes.c_void_p),
    ("name", ctypes.c_char * MAX_NAME),
    ("extra", ctypes.c_void_p),
    ("padding", ctypes.c_char * 8),
]

GGML_TYPE_F32, GGML_TYPE_I32 = 0, 26


def _ggml():
    from quantize.ggml import lib

    g = lib()
    g.ggml_op_name.argtypes = [ctypes.c_int]
    g.ggml_op_name.restype = ctypes.c_char_p
    g.ggml_nbytes.argtypes = [ctypes.c_void_p]
    g.ggml_nbytes.restype = ctypes.c_size_t
    g.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
    g.ggml_backend_tensor_get.restype = None
    return g


def _weight_name(raw: bytes) -> str:
    """imatrix.cpp's filter_tensor_name: CUDA0#blk.0.attn_k.weight#0 -> blk.0.attn_k.weight."""
    name = raw.decode(errors="replace")
    if "#" in name:
        name = name.split("#")[1]
    return name


def _read(g, t: GgmlTensor, dtype) -> np.ndarray:
    """The tensor's data as an array [ne3, ne2, ne1, ne0], whatever its strides (copied to the host)."""
    n = g.ggml_nbytes(ctypes.addressof(t))
    size = np.dtype(dtype).itemsize
    buf = np.empty((n + size - 1) // size, dtype=dtype)
    g.ggml_backend_tensor_get(ctypes.addressof(t), buf.ctypes.data, 0, n)
    shape = tuple(int(t.ne[i]) for i in reversed(range(MAX_DIMS)))
    strides = tuple(int(t.nb[i]) for i in reversed(range(MAX_DIMS)))
    return np.lib.stride_tricks.as_strided(buf, shape=shape, strides=strides).copy()


class Collector:
    """sums[name]: float64 [n_mat, n_per_row]; counts[name]: int64 [n_mat]; as imatrix.cpp's m_stats."""

    def __init__(self):
        self.g = _ggml()
        self.sums: dict[str, np.ndarray] = {}
        self.counts: dict[str, np.ndarray] = {}
        self.callback = ctypes.CFUNCTYPE(ctypes.c_bool, ctypes.c_void_p, ctypes.c_bool, ctypes.c_void_p)(self._on_tensor)

    def _on_tensor(self, ptr, ask, _user) -> bool:
        try:
            return self._collect(GgmlTensor.from_address(ptr), ask)
        except Exception:  # noqa: BLE001 - an exception must not cross into C; record it instead
            import traceback

            self.error = traceback.format_exc()
            return False

    def _collect(self, t: GgmlTensor, ask: bool) -> bool:
        op = self.g.ggml_op_name(t.op).decode()
        src0, src1 = t.src[0].contents, t.src[1].contents if t.src[1] else None
        name = _weight_name(src0.name)
        if ask:
            if op == "MUL_MAT_ID":
                return True
            if op != "MUL_MAT" or src1 is None:
                return False
            return src1.ne[1] >= 16 and src1.type == GGML_TYPE_F32 and name.startswith("blk.")
        x = _read(self.g, src1, np.float32)  # [ne3, ne2, ne1, ne0]
        ne0 = x.shape[-1]
        if op == "MUL_MAT_ID":
            ids = _read(self.g, t.src[2].contents, np.int32)[0, 0]  # [n_tokens, n_ids]
            n_as = int(src0.ne[2])
            sums = self.sums.setdefault(name, np.zeros((n_as, ne0)))
            counts = self.counts.setdefault(name, np.zeros(n_as, dtype=np.int64))
            x = x[0]  # [n_tokens, ne1, ne0]
            for idx in range(ids.shape[1]):
                rows = x[:, idx % x.shape[1], :].astype(np.float64)
                ex = ids[:, idx]
                np.add.at(sums, ex, rows * rows)
                np.add.at(counts, ex, 1)
        else:
            n_mat = int(src0.ne[2] * src0.ne[3])
            assert n_mat == 1, name
            rows = x.reshape(-1, ne0).astype(np.float64)
            sums = self.sums.setdefault(name, np.zeros((1, ne0)))
            sums[0] += (rows * rows).sum(axis=0)
            self.counts.setdefault(name, np.zeros(1, dtype=np.int64))[0] += rows.shape[0]
        return True


def llama_imatrix(gguf: Path, text: str, *, chunk_size: int = 512, max_chunks: int | None = None, threads: int = 2):
    """(tokens [n_chunks, chunk_size] as evaluated, Collector) for the GGUF model on `text`."""
    import llama_cpp

    collector = Collector()
    llama_cpp.llama_backend_init()
    mparams = llama_cpp.llama_model_default_params()
    model = llama_cpp.llama_model_load_from_file(str(gguf).encode(), mparams)
    assert model, gguf
    try:
        vocab = llama_cpp.llama_model_get_vocab(model)
        data = text.encode()
        buf = (llama_cpp.llama_token * (len(data) + 8))()
        n = llama_cpp.llama_tokenize(vocab, data, len(data), buf, len(data) + 8, True, False)
        assert n >= 0
        tokens = np.array(buf[:n], dtype=np.int64)
        n_chunks = len(tokens) // chunk_size if max_chunks is None else min(len(tokens) // chunk_size, max_chunks)
        chunks = tokens[: n_chunks * chunk_size].reshape(n_chunks, chunk_size).copy()
        if llama_cpp.llama_vocab_get_add_bos(vocab):
            chunks[:, 0] = llama_cpp.llama_vocab_bos(vocab)

        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = cparams.n_batch = cparams.n_ubatch = chunk_size
        cparams.n_threads = cparams.n_threads_batch = threads
        cparams.cb_eval = collector.callback
        cparams.cb_eval_user_data = None
        ctx = llama_cpp.llama_init_from_model(model, cparams)
        assert ctx
        batch = llama_cpp.llama_batch_init(chunk_size, 0, 1)
        try:
            for chunk in chunks:
                llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
                batch.n_tokens = chunk_size
                for i, tok in enumerate(chunk):
                    batch.token[i] = int(tok)
                    batch.pos[i] = i
                    batch.n_seq_id[i] = 1
                    batch.seq_id[i][0] = 0
                    batch.logits[i] = True  # every position out, as llama-imatrix asks
                rc = llama_cpp.llama_decode(ctx, batch)
                assert rc == 0, rc
                assert not hasattr(collector, "error"), collector.error
        finally:
            llama_cpp.llama_batch_free(batch)
            llama_cpp.llama_free(ctx)
    finally:
        llama_cpp.llama_model_free(model)
    return chunks, collector
