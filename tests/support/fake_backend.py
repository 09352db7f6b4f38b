"""A scripted backend for UI tests, at the edge: it stands in for llama.cpp (not for the app, the prompt
or the tool loop, which run for real on what it produces). Its tokenizer splits text into runs of
non-space and space characters, so prompts round-trip exactly; it answers 'reply N to <last user
message>' word by word. The prompt is built by the real prompt layer from the model's template: ChatML
by default, or any `template` given (Mixtral's, or one that raises)."""

from __future__ import annotations

import dataclasses
import re
import threading
import time

from localmix.backends import Done, Sampling, Speed, Stats, Text
from localmix.model_info import ModelInfo
from localmix.prompt import PromptFormat

USER = re.compile(r"<\|im_start\|>user\n(.*?)<\|im_end\|>|\[INST\] (.*?) \[/INST\]", re.S)
# Mixtral-8x7B-Instruct-v0.1's template: roles must alternate, and a system role is refused
MIXTRAL = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)


class WordTokenizer:
    bos, eos = -1, -2

    def __init__(self):
        self.words: list[str] = []
        self.ids: dict[str, int] = {}

    def tokenize(self, text: str, *, special: bool) -> list[int]:
        out = []
        for w in re.findall(r"\S+|\s+", text):
            if w not in self.ids:
                self.ids[w] = len(self.words)
                self.words.append(w)
            out.append(self.ids[w])
        return out

    def piece(self, token: int, special: bool = False) -> bytes:
        return self.words[token].encode()

    def text(self, tokens: list[int]) -> str:
        return "".join(self.words[t] for t in tokens)


def fake_info(name: str = "fake") -> ModelInfo:
    return ModelInfo(path=name, arch="llama", n_layer=1, n_embd=8, n_head=1, n_head_kv=1, head_dim=8, n_ff=8,
                     n_expert=0, n_expert_used=0, n_ctx_train=4096, n_vocab=0, tensors=(), name=name,
                     prompt=PromptFormat())


class FakeBackend:
    """`slow`: 200 more words, 20 ms each (to stop, or press keys, while a reply streams); `template`: the
    model's chat template (None: ChatML); `fail_after`: llama.cpp fails after that many words."""

    def __init__(self, slow: bool = False, ctx: int = 4096, template: str | None = None, fail_after: int | None = None):
        self.slow, self.ctx, self.calls, self.fail_after = slow, ctx, 0, fail_after
        self.info = fake_info()
        if template is not None:
            self.info = dataclasses.replace(self.info, prompt=PromptFormat(template=template, bos="<s>", eos="</s>"))
        self.tokenizer = WordTokenizer()
        self.seen: list[str] = []  # the prompts, as text
        self.prompt_tokens: list[int] = []  # their lengths
        self._cancel = threading.Event()

    def load(self, progress=None) -> None:
        pass

    def cancel(self) -> None:
        self._cancel.set()

    def close(self) -> None:
        pass

    def measure(self, prompt_tokens, gen_tokens) -> Speed:
        return Speed(1.0, 1.0)

    def words(self, prompt: str) -> list[str]:
        last = "".join((USER.findall(prompt) or [""])[-1])  # a template may drop the messages
        words = f"reply {self.calls} to {last}".split()
        return words + [f"w{i}" for i in range(200)] if self.slow else words

    def generate(self, tokens: list[int], sampling: Sampling, grammar: str | None = None):
        self._cancel.clear()
        self.calls += 1
        prompt = self.tokenizer.text(tokens)
        self.seen.append(prompt)
        self.prompt_tokens.append(len(tokens))
        words, stop = self.words(prompt), "eos"
        for i, w in enumerate(words):
            if self._cancel.is_set():
                stop = "cancelled"
                break
            if self.slow:
                time.sleep(0.02)
            if i == self.fail_after:
                raise RuntimeError("llama_decode returned -3")
            yield Text(("" if i == 0 else " ") + w)
        yield Done(Stats(prompt_tokens=len(tokens), gen_tokens=len(words), gen_seconds=0.01, ctx_used=len(tokens) + len(words),
                         ctx_total=self.ctx, stop=stop))


class ToolCallingBackend(FakeBackend):
    """Answers a user message with a JSON-protocol call of save_note, and a tool result with words."""

    def words(self, prompt: str) -> list[str]:
        last = "".join(USER.findall(prompt)[-1])
        if last.startswith("Result of "):
            return ["Done:", last.split(": ", 1)[1].split("\n")[0]]
        return ['{"tool_calls": [{"name": "save_note", "arguments": {"text": "buy milk"}}]}']
