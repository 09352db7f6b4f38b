"""The measurement behind `localmix eval`: a model's next-token log-probabilities against a reference's
on the same tokens, as llama-perplexity's KL-divergence mode does it (tools/perplexity/perplexity.cpp):

- the text is tokenized with MODEL's vocabulary (BOS first when the vocabulary adds one) and cut into
  chunks of `ctx` tokens, each evaluated from an empty context with BOS in its first position;
- positions ctx/2 .. ctx-2 of each chunk are scored (each then has at least half a context behind it),
  each against the chunk's next token;
- the reference (a GGUF through llama.cpp, or a Hugging Face checkpoint through quantize.forward in
  torch) is run once; its log-probabilities are kept in a cache file in llama.cpp's own base-file format
  (usable with `llama-perplexity --kl-divergence-base FILE --kl-divergence`) plus a trailer that says
  what it was computed from, and reused for every quant of the same model on the same tokens;
- one model is in memory at a time: the reference is closed before MODEL loads.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import quality
from .errors import LocalmixError
from .llamacpp import Engine
from .modelfile import ModelFile, open_model_file
from .paths import cache_dir, ensure_dir
from .text import shown

FORMAT = 1  # of the cache file; part of its key
MAGIC = b"_logits_"  # llama.cpp's base file starts so
TRAILER = b"localmix-eval-reference-v1\n"  # our identity trailer ends so
MAX_BATCH = 2048  # tokens per llama_decode (llama-perplexity's default n_batch)
MIN_CTX = 16

# progress(stage, done, total): stage "reference" or "model"; steps are chunks (layers for a checkpoint)
Progress = Callable[[str, int, int], None]


# -- the reference --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reference:
    """What MODEL is measured against: a GGUF (`kind` "gguf", `path` its part 1) or a checkpoint folder."""

    kind: str
    path: Path
    label: str  # as the user named it (shown, and recorded in the cache)


def _stat(path: Path) -> dict:
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


CHECKPOINT_FILES = re.compile(r"^(config\.json|.*\.safetensors|model\.safetensors\.index\.json|tokenizer.*)$")


def identity(ref: Reference, model: ModelFile | None = None) -> dict:
    """What the reference's log-probabilities depend on, as far as the file system can say: its files'
    paths, sizes and modification times."""
    if ref.kind == "gguf":
        return {"kind": "gguf", "files": [_stat(p) for p in (model.parts if model else (ref.path,))]}
    files = sorted(p for p in ref.path.iterdir() if CHECKPOINT_FILES.match(p.name) and p.is_file())
    return {"kind": "checkpoint", "folder": str(ref.path.resolve()), "files": [_stat(p) | {"path": p.name} for p in files]}


# -- text to chunks -------------------------------------------------------------------------------------


def tokenize(vocab: Engine, text: str) -> list[int]:
    """As llama-perplexity tokenizes its input: BOS first when the vocabulary adds one, no special tokens parsed."""
    return ([vocab.bos] if vocab.adds_bos else []) + vocab.tokenize(text, special=False)


def chunked(tokens: list[int], ctx: int, chunks: int) -> np.ndarray:
    """The first `chunks` whole chunks of `ctx` tokens (fewer if the text has fewer), int32 [n, ctx]."""
    n = min(chunks, len(tokens) // ctx)
    return np.asarray(tokens[: n * ctx], dtype=np.int32).reshape(n, ctx)


def first_scored(ctx: int) -> int:
    return ctx // 2


def n_scored(ctx: int) -> int:
    """Scored positions per chunk: first_scored .. ctx-2 (the last one has no next token in the chunk)."""
    return ctx - 1 - first_scored(ctx)


def model_input(chunk: np.ndarray, bos: int | None) -> list[int]:
    """A chunk as it is evaluated: its first token replaced by BOS when the vocabulary adds one."""
    out = chunk.tolist()
    if bos is not None:
        out[0] = bos
    return out


# -- the cache file -------------------------------------------------------------------------------------


@dataclass
class Cache:
    """A reference's compact log-probabilities, as read from its file (rows memory-mapped)."""

    path: Path
    tokens: np.ndarray  # int32 [n_chunk, n_ctx]
    n_vocab: int
    rows: np.ndarray  # uint16 [n_chunk, n_scored, row_width]
    meta: dict


def cache_name(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32] + ".logprobs"


def _header(n_ctx: int, n_vocab: int, tokens: np.ndarray) -> bytes:
    return MAGIC + struct.pack("<Iii", n_ctx, n_vocab, len(tokens)) + tokens.astype("<i4").tobytes()


def _trailer(meta: dict) -> bytes:
    body = json.dumps(meta, sort_keys=True).encode()
    return body + struct.pack("<Q", len(body)) + TRAILER


@dataclass(frozen=True)
class _Layout:
    n_ctx: int
    n_vocab: int
    n_chunk: int
    rows_at: int
    meta: dict


def _layout(path: Path) -> _Layout | None:
    """The cache file's header and trailer, if the file is whole (its size adds up); None otherwise."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(20)
            if len(head) < 20 or head[:8] != MAGIC:
                return None
            n_ctx, n_vocab, n_chunk = struct.unpack("<Iii", head[8:20])
            if not (MIN_CTX <= n_ctx and 0 < n_vocab < 1 << 24 and 0 < n_chunk) or size < len(TRAILER) + 8:
                return None
            f.seek(size - len(TRAILER) - 8)
            tail = f.read(8 + len(TRAILER))
            if tail[8:] != TRAILER:
                return None
            (n_meta,) = struct.unpack("<Q", tail[:8])
            rows_at = 20 + 4 * n_ctx * n_chunk
            rows_bytes = 2 * n_chunk * n_scored(n_ctx) * quality.row_width(n_vocab)
            if rows_at + rows_bytes + n_meta + 8 + len(TRAILER) != size:
                return None
            f.seek(rows_at + rows_bytes)
            meta = json.loads(f.read(n_meta))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return _Layout(n_ctx, n_vocab, n_chunk, rows_at, meta) if isinstance(meta, dict) else None


def read_cache_key(path: Path) -> dict | None:
    """The key a cache file was computed for (None for a file that is not one, or not whole)."""
    lay = _layout(path)
    return lay.meta.get("key") if lay else None


def read_cache(path: Path, key: dict) -> Cache | None:
    """The cache file at `path` if it is whole and was computed for `key`; None otherwise."""
    lay = _layout(path)
    if lay is None or lay.meta.get("key") != key or (lay.n_ctx, lay.n_chunk) != (key.get("ctx"), key.get("chunks")):
        return None
    try:
        tokens = np.fromfile(path, dtype="<i4", count=lay.n_ctx * lay.n_chunk, offset=20).reshape(lay.n_chunk, lay.n_ctx)
        rows = np.memmap(path, dtype="<u2", mode="r", offset=lay.rows_at,
                         shape=(lay.n_chunk, n_scored(lay.n_ctx), quality.row_width(lay.n_vocab)))
    except (OSError, ValueError):
        return None
    return Cache(path, tokens, lay.n_vocab, rows, lay.meta)


def partial_name(path: Path, pid: int | None = None) -> Path:
    from quantize.partials import partial_path

    return partial_path(path, pid)


def remove_stale_partials(folder: Path) -> None:
    """Partial cache files of processes that died without removing theirs (SIGKILL, power cut)."""
    from quantize.partials import remove_stale_partials as remove

    remove(folder, ".logprobs")


def write_cache(path: Path, tokens: np.ndarray, n_vocab: int, meta: dict, rows: Iterator[np.ndarray]) -> None:
    """The cache file, written beside its place under a lock and renamed into it when whole: an
    interruption (Ctrl-C, an error) leaves nothing; a kill leaves a partial file the next run removes."""
    import fcntl

    tmp = partial_name(path)
    try:
        with open(tmp, "wb") as f:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # a file system without locks: the PID in the name protects it
                pass
            f.write(_header(tokens.shape[1], n_vocab, tokens))
            for block in rows:
                f.write(np.ascontiguousarray(block, dtype="<u2").tobytes())
            f.write(_trailer(meta))
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):  # disk full, no permission: the file system's word, in one line
            raise LocalmixError(f"cannot write the reference cache {shown(path)}: {e.strerror or e}") from None
        raise


# -- log-probabilities -----------------------------------------------------------------------------------


def load_engine(path: Path, ctx: int, threads: int | None) -> Engine:
    """The GGUF loaded by llama.cpp to evaluate chunks of `ctx` tokens, placed by the planner when there is
    a GPU (all of it on the CPU otherwise)."""
    from .hardware import detect_gpus, physical_cores

    n_gpu, patterns = 0, []
    if detect_gpus():
        from .loader import prepare
        from .planner import gpu_layers_arg, override_patterns

        p = prepare(path, ctx=ctx)
        n_gpu, patterns = gpu_layers_arg(p.info, p.plan), override_patterns(p.plan)
    return Engine.load(path, n_gpu_layers=n_gpu, cpu_patterns=patterns, ctx=ctx, threads=threads or physical_cores(),
                       flash_attn=n_gpu > 0, batch=min(ctx, MAX_BATCH))


def gguf_logits(engine: Engine, tokens: np.ndarray, bos: int | None) -> Iterator[np.ndarray]:
    """Per chunk: the logits of its scored positions, float32 [n_scored, n_vocab]."""
    ctx = tokens.shape[1]
    for chunk in tokens:
        yield engine.logits_after(model_input(chunk, bos), first_scored(ctx))[: n_scored(ctx)]


def checkpoint_log_probs(folder: Path, tokens: np.ndarray, bos: int | None, threads: int | None,
                         on_step: Callable[[int, int], None]) -> Iterator[np.ndarray]:
    """Per chunk: the checkpoint's log-probabilities at the scored positions, run in torch one layer at a
    time over all chunks (steps: the layers, then the output layer)."""
    forward = _torch_forward()
    if threads:
        import torch

        torch.set_num_threads(threads)
    ctx = tokens.shape[1]
    with forward.Forward(folder) as fw:
        h = fw.embed(np.stack([model_input(c, bos) for c in tokens]))
        steps = fw.n_layer + 1
        on_step(0, steps)
        for i in range(fw.n_layer):
            h = fw.layer(i, h)
            on_step(i + 1, steps)
        for lp in fw.log_probs(h, first_scored(ctx)):
            yield lp[: n_scored(ctx)]
        on_step(steps, steps)


def _torch_forward():
    try:
        from quantize import forward
    except ImportError as e:
        if getattr(e, "name", "") == "torch" or "torch" in str(e):
            raise LocalmixError("a checkpoint reference runs in torch, which is not installed: "
                                "pip install 'localmix[calibrate]' (or use a GGUF reference)") from None
        raise
    return forward


def checkpoint_vocabulary(folder: Path) -> tuple[list[str], int]:
    """The tokens a GGUF made from the checkpoint would hold, and the checkpoint's trained context."""
    from quantize.checkpoint import read_json
    from quantize.metadata import read_hparams
    from quantize.vocab import load_vocab

    hp = read_hparams(read_json(folder / "config.json"))
    tokens = load_vocab(folder, hp.vocab_size).tokens
    return [t.decode("utf-8", errors="replace") if isinstance(t, bytes) else t for t in tokens], hp.n_ctx


def gguf_vocabulary(mf: ModelFile) -> list[str]:
    tokens = mf.kv.get("tokenizer.ggml.tokens")
    return tokens if isinstance(tokens, list) else []


# -- the evaluation --------------------------------------------------------------------------------------


@dataclass
class Evaluation:
    summary: quality.Summary
    model: str  # the GGUF's path
    model_name: str
    model_bytes: int
    model_parameters: int
    reference: Reference
    ctx: int
    chunks: int
    text_tokens: int  # the whole text's
    cache: Path
    cache_reused: bool  # the reference's log-probabilities came from the cache (not computed now)
    reference_seconds: float  # computing them (0 when reused)
    model_seconds: float

    def as_dict(self) -> dict:
        return {
            "model": {"path": self.model, "name": self.model_name, "bytes": self.model_bytes,
                      "parameters": self.model_parameters},
            "reference": {"kind": self.reference.kind, "path": str(self.reference.path), "given": self.reference.label},
            "ctx": self.ctx, "chunks": self.chunks, "text_tokens": self.text_tokens,
            **quality.as_dict(self.summary),
            "cache": {"path": str(self.cache), "reused": self.cache_reused},
            "seconds": {"reference": self.reference_seconds, "model": self.model_seconds},
        }


def _checked(ctx: int, limit: int, what: str) -> None:
    if ctx > limit:
        raise LocalmixError(f"--ctx {ctx} is longer than {what}'s trained context ({limit})")


def evaluate(model: Path, ref: Reference, text: str, *, ctx: int = 512, chunks: int = 20, threads: int | None = None,
             progress: Progress | None = None) -> Evaluation:
    """MODEL's statistics against the reference on up to `chunks` chunks of `ctx` tokens of `text`."""
    from .loader import vocabulary
    from .model_info import model_info

    say = progress or (lambda stage, done, total: None)
    if ctx < MIN_CTX:
        raise LocalmixError(f"--ctx {ctx} is too short to measure anything (at least {MIN_CTX})")
    mf = open_model_file(model)
    info = model_info(mf)
    _checked(ctx, info.n_ctx_train, shown(mf.name))
    ref_mf = open_model_file(ref.path) if ref.kind == "gguf" else None
    if ref_mf is not None:
        ref_tokens, ref_ctx = gguf_vocabulary(ref_mf), model_info(ref_mf).n_ctx_train
    else:
        ref_tokens, ref_ctx = checkpoint_vocabulary(ref.path)
    if ref_tokens != gguf_vocabulary(mf):
        raise LocalmixError(f"{shown(mf.name)} and the reference {shown(ref.label)} have different vocabularies "
                            f"({len(gguf_vocabulary(mf))} and {len(ref_tokens)} tokens): KL divergence compares "
                            "distributions over the same tokens")
    _checked(ctx, ref_ctx, "the reference")

    vocab = vocabulary(mf)
    try:
        all_tokens = tokenize(vocab, text)
        bos = vocab.bos if vocab.adds_bos else None
    finally:
        vocab.close()
    tokens = chunked(all_tokens, ctx, chunks)
    if not len(tokens):
        raise LocalmixError(f"the text is {len(all_tokens)} tokens, shorter than one chunk of --ctx {ctx}")
    n_chunk, n_vocab = len(tokens), len(ref_tokens)

    key = {"format": FORMAT, "reference": identity(ref, ref_mf), "ctx": ctx, "chunks": n_chunk,
           "tokens_sha256": hashlib.sha256(tokens.astype("<i4").tobytes()).hexdigest(), "bos": bos}
    folder = ensure_dir(cache_dir() / "eval", "the eval cache folder")
    remove_stale_partials(folder)
    path = folder / cache_name(key)
    cache = read_cache(path, key)
    reused, t0 = cache is not None, time.perf_counter()
    if cache is None:
        if ref.kind == "checkpoint":
            _torch_forward()  # torch missing is said before anything is written
        meta = {"key": key, "reference": ref.label, "model_vocabulary_of": str(mf.path),
                "text_sha256": hashlib.sha256(text.encode()).hexdigest()}
        write_cache(path, tokens, n_vocab, meta, _reference_rows(ref, tokens, bos, ctx, threads, say))
        cache = read_cache(path, key)
        if cache is None:
            raise LocalmixError(f"the reference cache {shown(path)} could not be read back")
    ref_seconds = 0.0 if reused else time.perf_counter() - t0

    t0 = time.perf_counter()
    parts = []
    engine = load_engine(mf.path, ctx, threads)
    try:
        say("model", 0, n_chunk)
        for c, logits in enumerate(gguf_logits(engine, tokens, bos)):
            if logits.shape[1] != n_vocab:
                raise LocalmixError(f"{shown(mf.name)} gives {logits.shape[1]} logits per token, its vocabulary has {n_vocab}")
            parts.append(quality.compared(cache.rows[c], n_vocab, logits, tokens[c, first_scored(ctx) + 1:]))
            say("model", c + 1, n_chunk)
    finally:
        engine.close()
    return Evaluation(
        summary=quality.summarize(quality.joined(parts)), model=str(mf.path), model_name=info.name, model_bytes=mf.size,
        model_parameters=info.n_params, reference=ref, ctx=ctx,
        chunks=n_chunk, text_tokens=len(all_tokens), cache=path, cache_reused=reused, reference_seconds=ref_seconds,
        model_seconds=time.perf_counter() - t0,
    )


def _reference_rows(ref: Reference, tokens: np.ndarray, bos: int | None, ctx: int, threads: int | None,
                    say: Progress) -> Iterator[np.ndarray]:
    """The reference's compact log-probabilities, chunk by chunk (computed as they are written)."""
    n_chunk = len(tokens)
    if ref.kind == "gguf":
        engine = load_engine(ref.path, ctx, threads)
        try:
            say("reference", 0, n_chunk)
            for c, logits in enumerate(gguf_logits(engine, tokens, bos)):
                yield quality.compact(logits)
                say("reference", c + 1, n_chunk)
        finally:
            engine.close()
        return
    for lp in checkpoint_log_probs(ref.path, tokens, bos, threads, lambda done, total: say("reference", done, total)):
        yield quality.compact(lp)
