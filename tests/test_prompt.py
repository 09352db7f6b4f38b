"""Conversations to tokens, on the real vocabularies of the test models (llama.cpp's tokenizer, no
weights loaded): chat templates, the JSON tool protocol, Mistral's native format, the text of the
tokens, and trimming to the context with the tools counted."""

from datetime import datetime

import pytest

from localmix import prompt
from localmix.errors import TemplateError
from localmix.llamacpp import Engine
from localmix.model_info import read_model_info
from localmix.prompt.template import fold_system, render
from tests.support.checkpoints import MIXTRAL_TEMPLATE

CALC = {"name": "calculator", "description": "Evaluate an arithmetic expression",
        "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]}}


@pytest.fixture(scope="module")
def v3(tiny_gguf):
    vocab = Engine.vocab_only(tiny_gguf("Q4_K_M"))
    yield read_model_info(tiny_gguf("Q4_K_M")).prompt, vocab
    vocab.close()


@pytest.fixture(scope="module")
def chatml(smol):
    vocab = Engine.vocab_only(smol)
    yield read_model_info(smol).prompt, vocab
    vocab.close()


def test_the_system_prompt_is_folded_when_the_template_rejects_it():
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    assert render(MIXTRAL_TEMPLATE, msgs, bos="<s>", eos="</s>") == "<s>[INST] Be brief.\n\nHello [/INST]"
    assert fold_system([{"role": "system", "content": "S"}]) == [{"role": "user", "content": "S"}]
    with pytest.raises(TemplateError, match="rejected the conversation: Conversation roles must alternate"):
        render(MIXTRAL_TEMPLATE, [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    with pytest.raises(TemplateError, match="does not compile"):
        render("{% for %}", msgs)


def test_no_template_means_chatml():
    assert render(None, [{"role": "user", "content": "hi"}]) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_strftime_now_is_now():
    shown = render("{{ strftime_now('%Y-%m-%d %H:%M:%S') }}", [])
    assert abs((datetime.strptime(shown, "%Y-%m-%d %H:%M:%S") - datetime.now()).total_seconds()) < 5


def test_chat_template_tokens(chatml):
    fmt, vocab = chatml
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    tokens = prompt.encode(fmt, vocab, msgs)
    assert tokens == vocab.tokenize(render(fmt.template, msgs, bos=fmt.bos, eos=fmt.eos), special=True)
    assert prompt.text_of(vocab, tokens) == render(fmt.template, msgs, bos=fmt.bos, eos=fmt.eos)
    assert not prompt.native(fmt, vocab)


def test_json_protocol_for_models_without_tool_tokens(chatml):
    fmt, vocab = chatml
    msgs = [{"role": "user", "content": "What is 2+2?"}]
    text = prompt.text_of(vocab, prompt.encode(fmt, vocab, msgs, [CALC]))
    assert text.startswith("<|im_start|>system\nYou can call these tools") and '"name": "calculator"' in text
    assert '{"tool_calls": [' in text


def test_native_tools_text_is_what_the_tokens_say(v3):
    """The text of the tokens, SentencePiece's word-start spaces included: [AVAILABLE_TOOLS] [{ ..."""
    fmt, vocab = v3
    assert prompt.native(fmt, vocab)
    msgs = [{"role": "user", "content": "What is 2+2?"}]
    tokens = prompt.encode(fmt, vocab, msgs, [CALC])
    text = prompt.text_of(vocab, tokens)
    assert text.startswith('<s>[AVAILABLE_TOOLS] [{"type": "function", "function": {"name": "calculator"')
    assert text.endswith("[/AVAILABLE_TOOLS][INST] What is 2+2?[/INST]")
    forced = prompt.encode(fmt, vocab, msgs, [CALC], force_tool_calls=True)
    assert forced[:-1] == tokens and prompt.text_of(vocab, forced[-1:]) == "[TOOL_CALLS]"


def conversation(turns: int) -> list[dict]:
    msgs = [{"role": "system", "content": "Stay calm."}]
    for i in range(turns):
        msgs += [{"role": "user", "content": f"Question number {i}: " + "tell me more " * 10},
                 {"role": "assistant", "content": f"Answer number {i}: " + "here is more " * 10}]
    return msgs + [{"role": "user", "content": "And the last question?"}]


def test_fit_counts_the_tools(chatml):
    """A budget the conversation fits without the tool specifications but not with them: old turns go."""
    fmt, vocab = chatml
    msgs = conversation(6)
    without, with_tools = len(prompt.encode(fmt, vocab, msgs)), len(prompt.encode(fmt, vocab, msgs, [CALC]))
    assert with_tools > without + 50
    budget = (without + with_tools) // 2
    assert prompt.fit(fmt, vocab, msgs, budget) == (msgs, 0)
    kept, dropped = prompt.fit(fmt, vocab, msgs, budget, [CALC])
    assert dropped > 0 and len(prompt.encode(fmt, vocab, kept, [CALC])) <= budget
    assert kept[0] == msgs[0] and kept[1]["role"] == "user" and kept[-1] == msgs[-1]
    assert kept[1:] == msgs[1 + dropped:]


def test_fit_keeps_the_system_prompt_and_the_last_message_whatever_the_budget(chatml):
    fmt, vocab = chatml
    msgs = conversation(3)
    kept, dropped = prompt.fit(fmt, vocab, msgs, 10)
    assert kept == [msgs[0], msgs[-1]] and dropped == len(msgs) - 2
