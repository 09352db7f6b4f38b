"""A llama / Mistral / Mixtral checkpoint run in torch one layer at a time, straight from the
memory-mapped safetensors: the forward pass behind `--imatrix auto` (calibrate.py) and behind
`localmix eval --reference CHECKPOINT`.

Semantics are transformers' (LlamaForCausalLM, MistralForCausalLM, MixtralForCausalLM) in float32:
RMSNorm, RoPE in the checkpoint's layout (rotate_half; default, linear and llama3 scaling), causal
grouped-query attention within each chunk, Mixtral's router (softmax over all experts, top-k,
renormalised) and SwiGLU experts. Chunks are independent sequences, as in llama-imatrix and
llama-perplexity.

Memory: the hidden states of all chunks, plus one layer's attention weights and one expert's (or one
dense MLP's) three matrices at a time; the big intermediate activations are computed in blocks of rows.
Independent of the number of layers and of experts.

`matmul="bfloat16"` multiplies bf16 weights with activations rounded to bf16 (float32 accumulation, as
llama.cpp's CPU kernels do with BF16 weights), everything else in float32: on a CPU with AVX512-BF16 or
AMX about 2.5 times faster than float32. The default, float32, is transformers' float32 forward.

torch is imported here only: `quantize` itself imports without it.
"""

from __future__ import annotations

import math
import os
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

# OpenMP threads that spin between parallel regions starve each other (and the quantizing threads)
# on a busy machine: measured 4x slower. Effective only when torch is first imported here.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# oneDNN keeps a compiled kernel per matrix shape; experts see a new row count each time: ~10 MiB a layer.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "8")
import torch

from .checkpoint import Checkpoint, TensorRef, open_checkpoint
from .layout import check_layout
from .metadata import HParams, read_hparams

# observer(gguf_name, x_rows, expert): the input rows [n, n_per_row] of one matrix multiplication,
# expert None for a plain matrix.
Observer = Callable[[str, "torch.Tensor", "int | None"], None]

BLOCK_FLOATS = 1 << 22  # floats in one block of intermediate activations (16 MiB)
TORCH_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def inv_freq(hp: HParams) -> torch.Tensor:
    """RoPE frequencies as transformers computes them (its ROPE_INIT_FUNCTIONS for each scaling type)."""
    dim = hp.head_dim
    freq = 1.0 / (hp.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).to(dtype=torch.float) / dim))
    rope = hp.rope
    kind = rope.get("rope_type", "default")
    if kind == "linear":
        return freq / rope["factor"]
    if kind == "llama3":
        factor, lo, hi = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
        old = rope["original_max_position_embeddings"]
        wavelen = 2 * math.pi / freq
        scaled = torch.where(wavelen > old / lo, freq / factor, freq)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old / hi) * ~(wavelen > old / lo)
        return torch.where(medium, smoothed, scaled)
    return freq


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Forward:
    """The checkpoint in `folder`, checked as `quantize` checks it (config.json, tensor shapes), ready
    to run layer by layer: `h = embed(tokens)`, then `h = layer(i, h)` for each i, then `log_probs(h)`."""

    def __init__(self, folder: Path, *, device: str | None = None, matmul: str = "float32", threads: int | None = None):
        self.ck: Checkpoint = open_checkpoint(Path(folder))
        try:
            self.hp: HParams = read_hparams(self.ck.config)
            check_layout(self.ck.tensors, self.hp)
        except BaseException:
            self.ck.close()
            raise
        self.device = torch.device(device or default_device())
        self.matmul = {"float32": torch.float32, "bfloat16": torch.bfloat16}[matmul]
        self.n_layer = self.hp.n_layer
        self._inv_freq = inv_freq(self.hp)
        self._rope: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._output: torch.Tensor | None = None
        # threads > 1 on the CPU: independent pieces of work (experts, groups of chunks, blocks of rows) on
        # a pool of single-threaded workers (the caller sets torch's threads to 1), as the quantizing pass
        # runs its blocks. OpenMP's barriers between threads were 2 times slower on a busy machine.
        self._threads = threads or 1
        self._pool = ThreadPoolExecutor(self._threads) if self._threads > 1 and self.device.type == "cpu" else None

    # ---- weights --------------------------------------------------------------------------------

    def _ref(self, name: str) -> TensorRef:
        return self.ck.tensors[name]

    def weight(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """One checkpoint tensor as a new tensor on the device; its pages of the mapping leave our
        resident set (the page cache keeps them for the quantizing pass that follows)."""
        ref = self._ref(name)
        with warnings.catch_warnings():  # the mapping is read-only; we only read it, and copy
            warnings.simplefilter("ignore", UserWarning)
            src = torch.frombuffer(ref.file._mapped(), dtype=TORCH_DTYPES[ref.dtype], count=ref.n_elements, offset=ref.begin)
        out = src.reshape(ref.shape).to(device=self.device, dtype=dtype, copy=True)
        del src
        ref.file.release(ref.begin, ref.end)
        return out

    def _layer_weight(self, i: int, suffix: str) -> torch.Tensor:
        return self.weight(f"model.layers.{i}.{suffix}")

    def _matrix(self, name: str) -> torch.Tensor:
        """A weight matrix in the dtype of the multiplications."""
        return self.weight(name, self.matmul)

    def _mm(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """x @ w.T, in float32 out."""
        if w.dtype == torch.float32:
            return x @ w.T
        return (x.to(w.dtype) @ w.T).float()

    def close(self) -> None:
        self._output = None
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        self.ck.close()

    def _map(self, fn: Callable, items: Iterable) -> Iterator:
        """fn over items, results in order; on the pool when there is one, at most `threads` in flight."""
        if self._pool is None:
            yield from map(fn, items)
            return

        def run(item):
            with torch.inference_mode():  # thread-local: the workers need it too
                return fn(item)

        window: deque = deque()
        for item in items:
            window.append(self._pool.submit(run, item))
            if len(window) >= self._threads:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()

    def __enter__(self) -> Forward:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- the pass -------------------------------------------------------------------------------

    @torch.inference_mode()
    def embed(self, tokens: np.ndarray) -> torch.Tensor:
        """[n_chunks, n_ctx] token ids -> hidden states [n_chunks, n_ctx, n_embd] (only the rows used are read)."""
        tokens = np.asarray(tokens, dtype=np.int64)
        if tokens.ndim != 2:
            raise ValueError("tokens must be [n_chunks, n_ctx]")
        if tokens.size and (tokens.min() < 0 or tokens.max() >= self.hp.vocab_size):
            raise ValueError(f"token ids must be below the vocabulary size {self.hp.vocab_size}")
        ref = self._ref("model.embed_tokens.weight")
        raw = ref.file.raw(ref)
        rows = torch.from_numpy(np.ascontiguousarray(raw[tokens.reshape(-1)]))
        if ref.dtype == "BF16":  # numpy keeps bf16 as uint16
            rows = rows.view(torch.int16).view(torch.bfloat16)
        del raw
        return rows.to(device=self.device, dtype=torch.float32).reshape(*tokens.shape, self.hp.n_embd)

    def _norm(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.hp.rms_eps))

    def _cos_sin(self, n_ctx: int) -> tuple[torch.Tensor, torch.Tensor]:
        if n_ctx not in self._rope:
            pos = torch.arange(n_ctx, dtype=torch.float32)
            freqs = pos[:, None] * self._inv_freq[None, :]
            emb = torch.cat((freqs, freqs), dim=-1)
            self._rope[n_ctx] = (emb.cos().to(self.device), emb.sin().to(self.device))
        return self._rope[n_ctx]

    @torch.inference_mode()
    def layer(self, i: int, h: torch.Tensor, observer: Observer | None = None) -> torch.Tensor:
        """Layer i on all chunks: h [n_chunks, n_ctx, n_embd] -> the same shape (h itself is updated)."""
        see = observer or (lambda name, x, expert: None)
        h = self._attention(i, h, see)
        return self._ffn(i, h, see)

    def _attention(self, i: int, h: torch.Tensor, see: Observer) -> torch.Tensor:
        hp = self.hp
        n_chunks, n_ctx, d = h.shape
        norm = self._layer_weight(i, "input_layernorm.weight")
        wq, wk, wv, wo = (self._matrix(f"model.layers.{i}.self_attn.{p}_proj.weight") for p in "qkvo")
        cos, sin = self._cos_sin(n_ctx)
        group = hp.n_head // hp.n_head_kv
        # chunks in groups so that q, k, v and the attention scores of a group stay within a block
        per_chunk = n_ctx * (hp.n_head * hp.head_dim * 3 + hp.n_head * n_ctx)
        step = max(1, min(BLOCK_FLOATS // per_chunk, -(-n_chunks // self._threads)))

        def attend(c0: int) -> None:
            x = self._norm(h[c0:c0 + step], norm)
            b = x.shape[0]
            rows = x.reshape(-1, d)
            for name in ("attn_q", "attn_k", "attn_v"):
                see(f"blk.{i}.{name}.weight", rows, None)
            rows = rows.to(self.matmul)
            q = self._mm(rows, wq).view(b, n_ctx, hp.n_head, hp.head_dim).transpose(1, 2)
            k = self._mm(rows, wk).view(b, n_ctx, hp.n_head_kv, hp.head_dim).transpose(1, 2)
            v = self._mm(rows, wv).view(b, n_ctx, hp.n_head_kv, hp.head_dim).transpose(1, 2)
            del x, rows
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
            if group > 1:
                k = k.repeat_interleave(group, dim=1)
                v = v.repeat_interleave(group, dim=1)
            a = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=hp.head_dim ** -0.5)
            del q, k, v
            a = a.transpose(1, 2).reshape(-1, hp.n_head * hp.head_dim)
            see(f"blk.{i}.attn_output.weight", a, None)
            h[c0:c0 + step] += self._mm(a, wo).view(b, n_ctx, d)

        for _ in self._map(attend, range(0, n_chunks, step)):
            pass
        return h

    def _ffn(self, i: int, h: torch.Tensor, see: Observer) -> torch.Tensor:
        """The feed-forward half, its output added into h in place (no second copy of the hidden states)."""
        x = self._norm(h, self._layer_weight(i, "post_attention_layernorm.weight")).reshape(-1, self.hp.n_embd)
        (self._moe if self.hp.is_moe else self._dense)(i, x, h.view(-1, self.hp.n_embd), see)
        return h

    def _rows(self, n_ff: int) -> int:
        return max(1, BLOCK_FLOATS // (2 * n_ff))

    def _swiglu(self, x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
                names: tuple[str, str, str], expert: int | None, see: Observer, parallel: bool = False,
                into: torch.Tensor | None = None) -> torch.Tensor:
        """down(silu(gate x) * up x), in blocks of rows (on the pool when `parallel`), added into `into`
        when given; the observer sees gate's and up's input x and down's input."""
        gate, up, down = names
        out = torch.zeros((x.shape[0], w_down.shape[0]), dtype=x.dtype, device=x.device) if into is None else into
        step = self._rows(w_gate.shape[0])
        if parallel:
            step = max(1, min(step, -(-x.shape[0] // self._threads)))

        def block(r0: int) -> None:
            xr = x[r0:r0 + step]
            see(gate, xr, expert)
            see(up, xr, expert)
            xb = xr.to(w_gate.dtype)
            act = torch.nn.functional.silu(self._mm(xb, w_gate))
            act *= self._mm(xb, w_up)
            see(down, act, expert)
            out[r0:r0 + step] += self._mm(act, w_down)

        blocks = range(0, x.shape[0], step)
        for _ in self._map(block, blocks) if parallel else map(block, blocks):
            pass
        return out

    def _dense(self, i: int, x: torch.Tensor, h: torch.Tensor, see: Observer) -> None:
        ws = [self._matrix(f"model.layers.{i}.mlp.{p}_proj.weight") for p in ("gate", "up", "down")]
        names = tuple(f"blk.{i}.ffn_{p}.weight" for p in ("gate", "up", "down"))
        self._swiglu(x, *ws, names, None, see, parallel=True, into=h)

    def route(self, i: int, x: torch.Tensor, see: Observer) -> tuple[torch.Tensor, torch.Tensor]:
        """Mixtral's router: (weights [n, k] renormalised over the top k, expert ids [n, k])."""
        see(f"blk.{i}.ffn_gate_inp.weight", x, None)
        logits = x @ self._layer_weight(i, "block_sparse_moe.gate.weight").T
        probs = torch.softmax(logits, dim=-1)
        top, ids = torch.topk(probs, self.hp.n_expert_used, dim=-1)
        return top / top.sum(dim=-1, keepdim=True), ids

    def _moe(self, i: int, x: torch.Tensor, h: torch.Tensor, see: Observer) -> None:
        weights, ids = self.route(i, x, see)
        names = tuple(f"blk.{i}.ffn_{p}_exps.weight" for p in ("gate", "up", "down"))

        def expert(e: int) -> tuple[torch.Tensor, torch.Tensor] | None:
            # only the tokens routed to the expert, in token order (as llama.cpp counts them)
            token, slot = torch.nonzero(ids == e, as_tuple=True)
            if token.numel() == 0:
                return None
            p = f"model.layers.{i}.block_sparse_moe.experts.{e}."
            w1, w3, w2 = (self._matrix(p + f"w{k}.weight") for k in (1, 3, 2))
            return token, self._swiglu(x[token], w1, w3, w2, names, e, see) * weights[token, slot, None]

        for done in self._map(expert, range(self.hp.n_expert)):
            if done is not None:
                h.index_add_(0, *done)

    def _output_weight(self) -> torch.Tensor:
        if self._output is None:
            name = "lm_head.weight" if "lm_head.weight" in self.ck.tensors else "model.embed_tokens.weight"  # tied
            self._output = self.weight(name)
        return self._output

    @torch.inference_mode()
    def log_probs(self, h: torch.Tensor, first: int = 0) -> Iterator[np.ndarray]:
        """Final norm and output matrix, per chunk: float32 [n_ctx - first, n_vocab] log-softmax of
        the logits at positions first.. of the chunk."""
        norm = self.weight("model.norm.weight")
        out = self._output_weight()
        for c in range(h.shape[0]):
            x = self._norm(h[c, first:], norm)
            yield torch.log_softmax(x @ out.T, dim=-1).to("cpu", torch.float32).numpy()

    @torch.inference_mode()
    def logits(self, tokens: np.ndarray) -> np.ndarray:
        """The whole forward pass of [n_chunks, n_ctx] tokens to float32 logits [n_chunks, n_ctx, n_vocab]
        (for tests and small inputs: every logit is kept)."""
        h = self.embed(tokens)
        for i in range(self.n_layer):
            h = self.layer(i, h)
        norm, out = self.weight("model.norm.weight"), self._output_weight()
        return (self._norm(h, norm) @ out.T).to("cpu", torch.float32).numpy()
