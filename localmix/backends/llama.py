"""The llama.cpp backend (llama-cpp-python): loads a GGUF with a plan and streams chat replies.

The plan reaches llama.cpp through `llama_model_params.tensor_buft_overrides`, a NULL-terminated array
of {regex, buffer type}: every layer is offloaded (-ngl), and the plan's CPU experts are pinned to the
host buffer type, as `-ot REGEX=CPU` does. llama-cpp-python declares the field but never sets it, so we
hand Llama() default parameters with it (and a load-progress callback) already filled in.
"""

from __future__ import annotations

import codecs
import ctypes
import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator

from ..chat_template import render
from ..hardware import cpu_buffer_type
from ..model_info import ModelInfo
from ..planner import Plan, gpu_layers_arg, override_patterns
from . import ContextFull, Sampling, Stats

KV_GGML_TYPES = {"f16": 1, "q8_0": 8, "q4_0": 2}  # ggml_type ids for type_k / type_v

_params_lock = threading.Lock()  # the default-params hook below is process-wide while a model loads


class _BuftOverride(ctypes.Structure):
    _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]


class LlamaBackend:
    def __init__(self, info: ModelInfo, plan: Plan, *, ctx: int, kv_type: str = "f16", threads: int | None = None,
                 verbose: bool = False):
        self.info, self.plan, self.ctx, self.kv_type = info, plan, ctx, kv_type
        self.threads, self.verbose = threads, verbose
        self.llm = None
        self.stats = Stats(ctx_total=ctx)
        self.load_log: list[str] = []  # llama.cpp's log lines while loading (overrides are listed there)
        self._cancel = threading.Event()

    # -- loading --------------------------------------------------------------------------------------

    def load(self, progress: Callable[[float], None] | None = None) -> None:
        import llama_cpp

        patterns = override_patterns(self.plan)
        overrides = (_BuftOverride * (len(patterns) + 1))()
        buft = cpu_buffer_type()
        keep = [p.encode() for p in patterns]  # the C strings must outlive the load
        for i, p in enumerate(keep):
            overrides[i].pattern, overrides[i].buft = p, buft
        overrides[len(keep)].pattern, overrides[len(keep)].buft = None, None

        def on_progress(fraction: float, _user) -> bool:
            if progress:
                progress(float(fraction))
            return True

        progress_cb = llama_cpp.llama_progress_callback(on_progress)
        # Flash attention: on the GPU always; on the CPU when the KV cache is quantized (llama.cpp needs
        # it for a quantized V cache).
        flash = self.plan.n_gpu_layers > 0 or self.kv_type != "f16"
        with _model_params(overrides if patterns else None, progress_cb), self._capture_log():
            self.llm = llama_cpp.Llama(
                self.info.path,
                n_gpu_layers=gpu_layers_arg(self.info, self.plan),
                n_ctx=self.ctx,
                n_batch=512,
                n_ubatch=512,
                n_threads=self.threads,
                n_threads_batch=self.threads,
                flash_attn=flash,
                type_k=KV_GGML_TYPES[self.kv_type],
                type_v=KV_GGML_TYPES[self.kv_type],
                verbose=self.verbose,
            )
        self._keepalive = (overrides, keep, progress_cb)
        self._control = self._control_ids()

    def _control_ids(self) -> dict[str, int]:
        """Ids of Mistral's tool tokens, when the vocabulary has them as single control tokens."""
        from ..tools.mistral import CONTROL

        ids = {}
        for text in CONTROL:
            toks = self.llm.tokenize(text.encode(), add_bos=False, special=True)
            if len(toks) == 1:
                ids[text] = toks[0]
        if len(ids) == len(CONTROL):
            ids.update({"<s>": self.llm.token_bos(), "</s>": self.llm.token_eos()})
            return ids
        return {}

    @property
    def native_tools(self) -> bool:
        """Mistral's native tool tokens ([AVAILABLE_TOOLS], [TOOL_CALLS]...) are in the vocabulary."""
        return bool(self._control)

    @contextmanager
    def _capture_log(self):
        """Collect llama.cpp's log (all levels) while loading; echo it when verbose."""
        import sys

        import llama_cpp
        from llama_cpp import _logger

        def on_log(level, text, _user):
            line = text.decode(errors="replace")
            self.load_log.append(line)
            if self.verbose:
                print(line, end="", file=sys.stderr, flush=True)

        cb = llama_cpp.llama_log_callback(on_log)
        llama_cpp.llama_log_set(cb, ctypes.c_void_p(0))
        try:
            yield
        finally:
            llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))

    # -- chat -----------------------------------------------------------------------------------------

    def _piece(self, token: int, special: bool = False) -> bytes:
        import llama_cpp

        size = 64
        while True:
            buf = ctypes.create_string_buffer(size)
            n = llama_cpp.llama_token_to_piece(self.llm._model.vocab, token, buf, size, 0, special)
            if n >= 0:
                return buf.raw[:n]
            size = -n  # llama.cpp returns the size it needs, negated

    def render(self, messages: list[dict]) -> str:
        return render(self.info.chat_template, messages, bos=self.info.bos_text, eos=self.info.eos_text)

    def tokens_for(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        from ..tools import mistral
        from ..tools.loop import protocol_messages

        uses_tools = bool(tools) or any(m["role"] == "tool" or m.get("tool_calls") for m in messages)
        if uses_tools and self.native_tools:
            return mistral.encode(messages, tools, lambda t: self.llm.tokenize(t.encode(), add_bos=False), self._control)
        if uses_tools:
            messages = protocol_messages(messages, tools or [])
        prompt = self.render(messages)
        tokens = self.llm.tokenize(prompt.encode(), add_bos=False, special=True)
        bos = self.llm.token_bos()
        if self.info.add_bos and bos >= 0 and (not tokens or tokens[0] != bos):
            tokens.insert(0, bos)
        return tokens

    def count_tokens(self, messages: list[dict], tools: list[dict] | None = None) -> int:
        return len(self.tokens_for(messages, tools))

    def cancel(self) -> None:
        self._cancel.set()

    def stream(self, messages: list[dict], sampling: Sampling, *, tools: list[dict] | None = None, grammar=None,
               force_tool_calls: bool = False) -> Iterator[str]:
        """The reply, piece by piece. `tools`: the tools on offer; `grammar`: a llama.cpp grammar the reply
        must follow; `force_tool_calls`: start the reply with [TOOL_CALLS] (native tools)."""
        import llama_cpp

        self._cancel.clear()
        t0 = time.perf_counter()
        tokens = self.tokens_for(messages, tools)
        if force_tool_calls:
            tokens.append(self._control["[TOOL_CALLS]"])
        if len(tokens) >= self.ctx:
            raise ContextFull(f"the prompt has {len(tokens)} tokens, the context holds {self.ctx}")
        llm = self.llm
        cached = 0
        for a, b in zip(llm._input_ids[: llm.n_tokens], tokens):
            if a != b:
                break
            cached += 1
        ctx_ptr = llm._ctx.ctx
        llama_cpp.llama_perf_context_reset(ctx_ptr)
        if sampling.seed is not None:
            llm.set_seed(sampling.seed)
        max_new = min(sampling.max_tokens, self.ctx - len(tokens))
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.stats = Stats(cached_tokens=min(cached, len(tokens) - 1), ctx_total=self.ctx, stop="length")
        gen = llm.generate(tokens, temp=sampling.temperature, top_p=sampling.top_p, top_k=40, min_p=0.05, repeat_penalty=1.0,
                           grammar=grammar)
        visible = {self._control.get("[TOOL_CALLS]", -1)}  # shown as text, so that callers see a tool call
        n, started = 0, False
        try:
            for tok in gen:
                if n == 0:
                    self.stats.ttft = time.perf_counter() - t0
                if llama_cpp.llama_vocab_is_eog(llm._model.vocab, tok):
                    self.stats.stop = "eos"
                    break
                n += 1
                text = decoder.decode(self._piece(tok, special=tok in visible))
                if n == 1 or not started:
                    text = text.lstrip(" ")  # SentencePiece's word-start space on the reply's first word
                if text:
                    started = True
                    yield text
                if self._cancel.is_set():
                    self.stats.stop = "cancelled"
                    break
                if n >= max_new:
                    break
            tail = decoder.decode(b"", final=True)
            if tail:
                yield tail
        finally:
            gen.close()
            perf = llama_cpp.llama_perf_context(ctx_ptr)
            self.stats.prompt_tokens = perf.n_p_eval
            self.stats.prompt_seconds = perf.t_p_eval_ms / 1000
            self.stats.gen_tokens = perf.n_eval
            self.stats.gen_seconds = perf.t_eval_ms / 1000
            self.stats.ctx_used = llm.n_tokens

    def close(self) -> None:
        if self.llm is not None:
            self.llm.close()
            self.llm = None


@contextmanager
def _model_params(overrides, progress_cb):
    """Make llama-cpp-python start from default model params that already carry our tensor overrides
    and progress callback (its Llama() sets neither field)."""
    import llama_cpp.llama_cpp as C

    original = C.llama_model_default_params

    def with_overrides():
        p = original()
        if overrides is not None:
            p.tensor_buft_overrides = ctypes.cast(overrides, ctypes.c_void_p)
        p.progress_callback = progress_cb
        return p

    with _params_lock:
        C.llama_model_default_params = with_overrides
        try:
            yield
        finally:
            C.llama_model_default_params = original
