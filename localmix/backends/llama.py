"""The llama.cpp backend: loads a GGUF with a plan, evaluates the tokens it is given and streams what it
samples. The plan reaches llama.cpp as tensor buffer overrides: every layer is offloaded (-ngl) and the
plan's CPU experts are pinned to host memory, as `-ot REGEX=CPU` does. What llama-cpp-python does not
expose publicly is in localmix/llamacpp.py."""

from __future__ import annotations

import codecs
import threading
import time
from collections.abc import Callable, Iterator

from ..errors import ContextFull, LocalmixError
from ..hardware import Threads, auto_threads
from ..llamacpp import Engine
from ..model_info import ModelInfo
from ..planner import Plan, gpu_layers_arg, override_patterns, remote_patterns
from ..prompt import control_ids
from . import Done, Sampling, Speed, Stats, Text


class LlamaBackend:
    """`threads` None: chosen from the cores other programs leave free, again at the start of every reply
    (hardware.auto_threads; llama.cpp takes a new count between evaluations); a number: that many, always."""

    def __init__(self, info: ModelInfo, plan: Plan, *, ctx: int, kv_type: str = "f16", threads: int | None = None,
                 verbose: bool = False, repack: bool = True):
        self.info, self.plan, self.ctx, self.kv_type = info, plan, ctx, kv_type
        self.threads, self.verbose, self.repack = threads, verbose, repack
        self.engine: Engine | None = None
        self.threads_now: Threads | None = None  # the latest choice, for --verbose and stats
        self._cancel = threading.Event()

    def load(self, progress: Callable[[float], None] | None = None) -> None:
        """ModelFileError with llama.cpp's own reason when it refuses the file (Engine.load). A plan with
        workers loads in a process of its own (backends/isolated.py): llama.cpp aborts when a worker fails."""
        self.threads_now = auto_threads(self.threads)
        self.engine = Engine.load(
            self.info.path, n_gpu_layers=gpu_layers_arg(self.info, self.plan), cpu_patterns=override_patterns(self.plan),
            rpc_patterns=remote_patterns(self.plan), repack=self.repack,
            ctx=self.ctx, threads=self.threads_now.decode, kv_type=self.kv_type, progress=progress, verbose=self.verbose,
            batch=self.plan.n_batch, ubatch=self.plan.n_ubatch,
            # Flash attention: on the GPU always; on the CPU when the KV cache is quantized (llama.cpp
            # needs it for a quantized V cache).
            flash_attn=self.plan.n_gpu_layers > 0 or self.kv_type != "f16",
        )
        self.engine.set_threads(self.threads_now.decode, self.threads_now.batch)

    def _rethread(self) -> None:
        """With automatic threads, the count for what the machine looks like now, set when it changed."""
        if self.threads:
            return
        now = auto_threads()
        if (now.decode, now.batch) != self.engine.threads:
            self.engine.set_threads(now.decode, now.batch)
        self.threads_now = now

    @property
    def tokenizer(self) -> Engine:
        return self.engine

    @property
    def load_log(self) -> list[str]:
        return self.engine.log if self.engine else []

    def cancel(self) -> None:
        self._cancel.set()
        if self.engine is not None:
            self.engine.abort()  # a prompt being evaluated stops too, not only the sampling after it

    def generate(self, tokens: list[int], sampling: Sampling, grammar: str | None = None) -> Iterator[Text | Done]:
        eng = self.engine
        self._cancel.clear()
        t0 = time.perf_counter()
        self._rethread()
        if len(tokens) >= self.ctx:
            raise ContextFull(f"the prompt has {len(tokens)} tokens, the context holds {self.ctx}")
        if grammar is not None and not eng.accepts_grammar(grammar):
            raise LocalmixError("llama.cpp cannot parse the grammar made for this reply")
        cached = min(eng.cached_prefix(tokens), len(tokens) - 1)
        eng.reset_perf()
        max_new = min(sampling.max_tokens, self.ctx - len(tokens))
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        visible = control_ids(eng).get("[TOOL_CALLS]")  # shown as text, so that a tool call can be read back
        n, started, stop, ttft = 0, False, "length", 0.0
        try:
            for tok in eng.sample(tokens, temperature=sampling.temperature, top_p=sampling.top_p, seed=sampling.seed,
                                  grammar=grammar, frequency_penalty=sampling.frequency_penalty,
                                  presence_penalty=sampling.presence_penalty):
                if n == 0:
                    ttft = time.perf_counter() - t0
                if eng.is_end(tok):
                    stop = "eos"
                    break
                n += 1
                text = decoder.decode(eng.piece(tok, special=tok == visible))
                if not started:
                    text = text.lstrip(" ")  # SentencePiece's word-start space on the reply's first word
                if text:
                    started = True
                    yield Text(text)
                if self._cancel.is_set():
                    stop = "cancelled"
                    break
                if n >= max_new:
                    break
            else:  # the sampling ended itself: only an abort does that
                if self._cancel.is_set():
                    stop = "cancelled"
            tail = decoder.decode(b"", final=True)
            if tail:
                yield Text(tail)
        finally:
            perf = eng.perf()
        yield Done(Stats(prompt_tokens=perf.prompt_tokens, cached_tokens=cached, prompt_seconds=perf.prompt_seconds,
                         gen_tokens=perf.gen_tokens, gen_seconds=perf.gen_seconds, ttft=ttft, ctx_used=eng.n_tokens,
                         ctx_total=self.ctx, stop=stop))

    def measure(self, prompt_tokens: list[int], gen_tokens: int) -> Speed:
        eng = self.engine
        self._rethread()
        eng.forget()
        eng.reset_perf()
        eng.evaluate(prompt_tokens)
        perf = eng.perf()
        prefill = perf.prompt_tokens / perf.prompt_seconds
        eng.reset_perf()
        for i in range(gen_tokens):  # one token at a time, as decode runs (which token is immaterial)
            eng.evaluate([prompt_tokens[i % len(prompt_tokens)]])
        perf = eng.perf()
        return Speed(prefill, perf.gen_tokens / perf.gen_seconds)

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
            self.engine = None
