"""llama.cpp itself as the oracle: its own greedy continuation of a prompt, with each step's margin (the
top logit minus the runner-up). Greedy text of a tiny model sits on near-ties that other SIMD kernels
break differently, so tests either compare with this in the same process (same kernels) or assert a
semantic answer only where its margin is large."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class Greedy:
    tokens: list[int]
    text: str
    margins: list[float]  # per generated token


def greedy(path: Path, prompt_tokens: list[int], max_tokens: int, *, ctx: int = 1024, threads: int = 2) -> Greedy:
    """Evaluate the prompt in one batch, then pick the top token one step at a time until EOS."""
    from llama_cpp import Llama, llama_vocab_is_eog

    llm = Llama(str(path), n_ctx=ctx, n_threads=threads, n_threads_batch=threads, logits_all=True, verbose=False)
    try:
        llm.eval(prompt_tokens)
        out, margins = [], []
        for _ in range(max_tokens):
            logits = np.asarray(llm.scores[llm.n_tokens - 1])
            top2 = np.argsort(logits)[-2:]
            tok = int(top2[1])
            if llama_vocab_is_eog(llm._model.vocab, tok):
                break
            out.append(tok)
            margins.append(float(logits[top2[1]] - logits[top2[0]]))
            llm.eval([tok])
        text = llm.detokenize(out).decode("utf-8", errors="replace")
        return Greedy(out, text, margins)
    finally:
        llm.close()


def logits(path: Path, tokens: list[int], threads: int = 2) -> np.ndarray:
    """llama.cpp's logits at every position of `tokens`."""
    from llama_cpp import Llama

    llm = Llama(str(path), n_ctx=512, logits_all=True, n_threads=threads, verbose=False)
    try:
        llm.eval(tokens)
        return np.array(llm.scores[: len(tokens)], dtype=np.float64)
    finally:
        llm.close()


def llama_quantize(src: Path, dst: Path, ftype: int) -> None:
    """llama.cpp's own llama-quantize (llama_model_quantize), the oracle for quantize's recipe and bytes."""
    import ctypes
    import os

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = os.cpu_count() or 1
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    assert rc == 0, f"llama_model_quantize failed with {rc}"


def full_log_probs(path, tokens: np.ndarray, bos: int | None) -> list[np.ndarray]:
    """The oracle: llama.cpp's logits at every position of each chunk (llama-cpp-python, logits_all), as
    float64 log-probabilities at the scored positions."""
    from llama_cpp import Llama

    from localmix.evaluate import model_input

    ctx = tokens.shape[1]
    llm = Llama(str(path), n_ctx=ctx, n_batch=ctx, n_ubatch=ctx, logits_all=True, n_threads=2, n_threads_batch=2,
                verbose=False)
    out = []
    try:
        for chunk in tokens:
            llm.reset()
            llm.eval(model_input(chunk, bos))
            x = np.array(llm.scores[ctx // 2: ctx - 1], dtype=np.float64)
            x -= x.max(axis=1, keepdims=True)
            out.append(x - np.log(np.exp(x).sum(axis=1, keepdims=True)))
    finally:
        llm.close()
    return out
