"""Rendering a conversation with the model's own chat template (the GGUF's tokenizer.chat_template), in
Jinja's sandbox as Hugging Face does. Templates that refuse a system role (Mixtral's raises "Only user
and assistant roles are supported!") get the system prompt folded into the first user turn instead of
having it silently dropped."""

from __future__ import annotations

from datetime import datetime
from functools import lru_cache

from ..errors import TemplateError

# Used when a GGUF has no template at all: plain ChatML.
CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


class _Raised(Exception):
    """raise_exception() called by the template itself."""


def _raise(message):
    raise _Raised(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=8)
def _compile(source: str):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except Exception as e:  # noqa: BLE001 - the template is the model file's code: any failure is the file's
        raise TemplateError(f"the model's chat template does not compile: {e}") from None


def fold_system(messages: list[dict]) -> list[dict]:
    """The system prompt as the start of the first user message (Mistral's own convention)."""
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    rest = [dict(m) for m in messages if m["role"] != "system"]
    if system:
        for m in rest:
            if m["role"] == "user":
                m["content"] = f"{system}\n\n{m['content']}"
                break
        else:
            rest.insert(0, {"role": "user", "content": system})
    return rest


def render(source: str | None, messages: list[dict], *, bos: str = "", eos: str = "", generation_prompt: bool = True) -> str:
    template = _compile(source or CHATML)
    kw = dict(bos_token=bos, eos_token=eos, add_generation_prompt=generation_prompt)
    try:
        return template.render(messages=messages, **kw)
    except Exception as first:  # noqa: BLE001 - the template is the model file's code
        if not any(m["role"] == "system" for m in messages):
            raise TemplateError(f"the model's chat template rejected the conversation: {first}") from None
    try:
        return template.render(messages=fold_system(messages), **kw)
    except Exception as e:  # noqa: BLE001
        raise TemplateError(f"the model's chat template rejected the conversation: {e}") from None
