"""`--imatrix auto`: the importance matrix computed from the checkpoint itself, in torch, during the
streaming pass, as llama.cpp's `llama-imatrix` computes it from a GGUF of the same model.

What llama-imatrix does (tools/imatrix/imatrix.cpp), and so what this does:
- the text is tokenized with the model's vocabulary, BOS first when the vocabulary adds one; chunks of
  `chunk_size` (512) tokens, each an independent sequence whose first token is replaced by BOS when the
  vocabulary adds one; only whole chunks are used;
- every matrix multiplication whose weights are a `blk.*` tensor gets an entry (attn_q, attn_k, attn_v,
  attn_output, ffn_gate_inp, ffn_gate/up/down or the stacked ffn_*_exps), output.weight none (its
  --process-output is off by default): the sum over tokens of x_j^2 of its input x, and the count of
  tokens; for the stacked experts one row of sums and one count per expert, over the tokens routed to it.
The weights the quantizer gets are llama-quantize's: sums / count in float32, 1 for an expert that no
token reached; so quantizing with `auto` and with the saved file gives the same bytes.

Layers are computed lazily: the first `weights(name)` of layer L runs layer L (and any before it not
yet run) on the hidden states of all calibration chunks, which are all that is kept between layers.
The routing counts (how often each expert of each layer was chosen) are the expert entries' counts.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .errors import QuantizeError
from .imatrix import Entry, Imatrix

CHUNK_SIZE = 512  # llama-imatrix's default n_ctx
BUILT_IN = "localmix calibration text"
_BLK = re.compile(r"^blk\.(\d+)\.")

def tokenize(folder: Path, text: str) -> list[int]:
    """`text` as llama.cpp tokenizes it with the GGUF made from the checkpoint in `folder`
    (common_tokenize: BOS first when the vocabulary adds one, special tokens not parsed)."""
    from .checkpoint import read_json
    from .metadata import read_hparams

    folder = Path(folder)
    return _tokenize(folder, read_hparams(read_json(folder / "config.json")), text)[0]


def _tokenize(folder: Path, hp, text: str) -> tuple[list[int], int | None]:
    """(the tokens, the BOS id when the vocabulary adds one, else None), by llama.cpp itself: the
    checkpoint's vocabulary written as convert.py writes it, into a GGUF of metadata alone, loaded
    vocab-only. (The Hugging Face tokenizers differ from llama.cpp's in places: a BPE splits "\n\n1"
    otherwise, for one.)"""
    import tempfile

    import gguf

    from .metadata import add_hparams
    from .vocab import load_vocab

    w = gguf.GGUFWriter(path=None, arch="llama")
    add_hparams(w, hp)
    load_vocab(folder, hp.vocab_size).add_to(w)
    with tempfile.TemporaryDirectory(prefix="localmix-vocab-") as tmp:
        path = Path(tmp) / "vocab.gguf"
        w.write_header_to_file(path=path)
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        w.close()
        return _llama_tokenize(path, text)


def _llama_tokenize(path: Path, text: str) -> tuple[list[int], int | None]:
    import ctypes

    import llama_cpp
    from llama_cpp import _logger

    quiet = llama_cpp.llama_log_callback(lambda level, msg, user: None)
    llama_cpp.llama_log_set(quiet, ctypes.c_void_p(0))
    try:
        params = llama_cpp.llama_model_default_params()
        params.vocab_only = True
        model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
        if not model:
            raise QuantizeError("llama.cpp cannot load this checkpoint's vocabulary")
        try:
            vocab = llama_cpp.llama_model_get_vocab(model)
            data = text.encode()
            size = len(data) + 8
            while True:
                buf = (llama_cpp.llama_token * size)()
                n = llama_cpp.llama_tokenize(vocab, data, len(data), buf, size, True, False)
                if n >= 0:
                    break
                size = -n  # llama.cpp returns the size it needs, negated
            bos = int(llama_cpp.llama_vocab_bos(vocab)) if llama_cpp.llama_vocab_get_add_bos(vocab) else None
            return buf[:n], bos
        finally:
            llama_cpp.llama_model_free(model)
    finally:
        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))


def chunks(tokens: list[int], chunk_size: int, bos: int | None, max_tokens: int | None = None) -> np.ndarray:
    """llama-imatrix's chunks: [n_chunks, chunk_size], whole chunks only, each starting with BOS when
    the vocabulary adds one (`bos` not None)."""
    n = len(tokens) // chunk_size
    if max_tokens is not None:
        n = min(n, max_tokens // chunk_size)
    out = np.asarray(tokens[: n * chunk_size], dtype=np.int64).reshape(n, chunk_size)
    if bos is not None:
        out[:, 0] = bos
    return out


class _Sums:
    """Sums of x^2 and counts per matrix (per expert for stacked experts), accumulated on the device in
    float64 (llama.cpp keeps float32 sums; float64 here costs nothing and only makes them closer to exact)."""

    def __init__(self, n_expert: int):
        self.n_expert = n_expert
        self.sums: dict = {}
        self.counts: dict[str, np.ndarray] = {}
        self._lock = threading.Lock()  # the forward's workers call in from several threads
        self._local = threading.local()  # (rows, their sums of squares): q, k, v share an input, as do gate and up

    def __call__(self, name: str, x, expert: int | None) -> None:
        import torch

        last = getattr(self._local, "last", None)
        if last is None or last[0] is not x:
            last = self._local.last = (x, x.square().sum(dim=0).double())
        with self._lock:
            if name not in self.sums:
                n_mat = self.n_expert if expert is not None else 1
                self.sums[name] = torch.zeros((n_mat, x.shape[-1]), dtype=torch.float64, device=x.device)
                self.counts[name] = np.zeros(n_mat, dtype=np.int64)
            self.sums[name][expert or 0] += last[1]
            self.counts[name][expert or 0] += x.shape[0]

    def forget(self) -> None:
        self._local = threading.local()

    def entry(self, name: str) -> Entry:
        return Entry(self.sums[name].to("cpu").numpy().astype(np.float32), self.counts[name].copy())


class Calibrator:
    """An `Importance` for quantize.convert: the imatrix of the checkpoint in `folder` on `text` (the
    built-in calibration text when None), computed layer by layer as the pass asks for weights."""

    source = "auto"

    def __init__(
        self,
        folder: Path,
        text: str | None = None,
        *,
        max_tokens: int | None = None,
        chunk_size: int = CHUNK_SIZE,
        device: str | None = None,
        threads: int | None = None,
        matmul: str | None = None,
        dataset: str | None = None,
        on_layer: Callable[[int, int], None] | None = None,
    ):
        import torch

        from .forward import Forward
        from .ggml import default_threads
        from .texts import calibration_text

        folder = Path(folder)
        if chunk_size < 1:
            raise QuantizeError(f"calibration chunk size must be positive, not {chunk_size}")
        threads = threads or default_threads()
        self.forward = Forward(folder, device=device, threads=threads)
        try:
            self.forward.matmul = getattr(torch, matmul or _fast_matmul(self.forward))
            if self.forward.device.type == "cpu":
                torch.set_num_threads(1)  # the forward's own workers, one thread each
            tokens, bos = _tokenize(folder, self.forward.hp, calibration_text() if text is None else text)
            self.tokens = chunks(tokens, chunk_size, bos, max_tokens)
            if len(self.tokens) == 0:
                bound = f" (--calibration-tokens {max_tokens})" if max_tokens is not None and max_tokens < len(tokens) else ""
                raise QuantizeError(f"calibration needs at least {chunk_size} tokens{bound}; the text has {len(tokens)}")
        except BaseException:
            self.forward.close()
            raise
        hp = self.forward.hp
        self.n_layer = hp.n_layer
        self.n_expert = hp.n_expert if hp.is_moe else 0
        self.chunk_size = chunk_size
        self.chunk_count = len(self.tokens)
        self.routing_tokens = int(self.tokens.size)
        self.datasets = [dataset or (BUILT_IN if text is None else "calibration text")]
        self.entries_count = hp.n_layer * (8 if hp.is_moe else 7)  # q, k, v, output + router and 3 experts, or 3 FFN
        self.on_layer = on_layer
        self._sums = _Sums(self.n_expert)
        self._h = None
        self._done = 0  # layers computed
        self._imatrix: Imatrix | None = None

    # ---- the Importance protocol ----------------------------------------------------------------

    def weights(self, name: str) -> np.ndarray | None:
        """llama-quantize's weights for tensor `name` (None for tensors llama-imatrix has no entry for:
        token_embd, output), running the calibration up to its layer first."""
        m = _BLK.match(name)
        if m is None:
            return None
        self._run_to(int(m.group(1)))
        if name not in self._sums.sums:
            return None
        return self._entries_imatrix([name]).weights(name)

    def routing_shape(self) -> tuple[int, int] | None:
        return (self.n_layer, self.n_expert) if self.n_expert else None

    def routing(self) -> np.ndarray:
        """uint64 [n_layer, n_expert]: how often each expert of each layer was chosen (the tokens its
        gate matrix saw); each row sums to routing_tokens x top-k."""
        self._run_to(self.n_layer - 1)
        counts = [self._sums.counts[f"blk.{i}.ffn_gate_exps.weight"] for i in range(self.n_layer)]
        return np.stack(counts).astype(np.uint64)

    def imatrix(self) -> Imatrix:
        """Everything computed, as llama-imatrix would save it (after running any layers the pass did not ask for)."""
        self._run_to(self.n_layer - 1)
        if self._imatrix is None:
            self._imatrix = self._entries_imatrix(sorted(self._sums.sums))
            self.close()
        return self._imatrix

    # ---- the pass -------------------------------------------------------------------------------

    def _entries_imatrix(self, names: list[str]) -> Imatrix:
        return Imatrix({n: self._sums.entry(n) for n in names}, self.chunk_count, self.chunk_size, list(self.datasets), self.source)

    def _run_to(self, layer: int) -> None:
        while self._done <= min(layer, self.n_layer - 1):
            if self._h is None:
                self._h = self.forward.embed(self.tokens)
            i = self._done
            self._h = self.forward.layer(i, self._h, self._sums)
            self._sums.forget()
            _release_freed_memory()
            self._done += 1
            if self.on_layer:
                self.on_layer(i, self.n_layer)
        if self._done == self.n_layer:
            self._h = None  # the last layer's outputs are not needed: no output.weight entry

    def close(self) -> None:
        self._h = None
        self.forward.close()



def _fast_matmul(forward) -> str:
    """bfloat16 where it is both lossless for the weights (all stored as bf16) and fast (a CPU with
    native bf16 dot products: AVX512-BF16 or AMX), else float32."""
    import torch

    stored_bf16 = all(ref.dtype == "BF16" for ref in forward.ck.tensors.values() if len(ref.shape) == 2)
    fast = forward.device.type == "cpu" and torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return "bfloat16" if stored_bf16 and fast else "float32"


def _release_freed_memory() -> None:
    """glibc keeps the freed blocks of a layer's activations in its heaps, and reuses them badly: without
    this, the resident set grew by about 1.5 GiB over the 30 layers of the upcycled fixture."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
