"""The llama.cpp backend on real GGUF files made by quantize from the test checkpoints, loaded by real
llama.cpp (a CPU build: -ngl is a no-op there, but the tensor overrides are applied and logged all the
same). Generated text is compared with llama.cpp's own greedy continuation in the same process, never
with words a tiny model might break a near-tie on."""

import threading

import pytest

from localmix import prompt
from localmix.backends import Done, Sampling, Text
from localmix.backends.llama import LlamaBackend
from localmix.errors import ContextFull, ModelFileError
from localmix.model_info import read_model_info
from localmix.planner import Budget, plan
from localmix.units import GiB
from tests.support.ggufs import base_model, serialise
from tests.support.llm import greedy

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
GREEDY = Sampling(max_tokens=32, temperature=0)


def loaded(path, vram_gib=0.0, ctx=1024):
    info = read_model_info(path)
    p = plan(info, Budget(vram=int(vram_gib * GiB), ram=16 * GiB), ctx)
    b = LlamaBackend(info, p, ctx=ctx, threads=2)
    return b, p


def events(b, msgs, sampling=GREEDY):
    out = list(b.generate(prompt.encode(b.info.prompt, b.tokenizer, msgs), sampling))
    assert isinstance(out[-1], Done) and all(isinstance(e, Text) for e in out[:-1])
    return "".join(e.text for e in out[:-1]), out[-1].stats


def test_overrides_reach_llama_cpp(smol, tiny_split):
    for path in (smol, tiny_split[0]):
        b, p = loaded(path, vram_gib=0.9 if path == smol else 660 / 1024)
        assert 0 < len(p.cpu_experts) < len([t for t in b.info.tensors if t.role == "expert"])  # a split plan
        assert path == smol or {t.part for t in b.info.tensors if t.name in p.cpu_experts} == {0, 1}  # from both parts
        progress = []
        b.load(progress=progress.append)
        try:
            overridden = {line.split()[1] for line in b.load_log if "buffer type overridden to CPU" in line}
            assert overridden == set(p.cpu_experts)
            assert progress and progress[-1] == 1.0
        finally:
            b.close()


def test_reply_is_llama_cpps_own_greedy_continuation(smol):
    b, _ = loaded(smol)
    b.load()
    try:
        tokens = prompt.encode(b.info.prompt, b.tokenizer, FRANCE)
        text, stats = events(b, FRANCE)
    finally:
        b.close()
    oracle = greedy(smol, tokens, GREEDY.max_tokens)
    assert text == oracle.text.lstrip(" ") and text
    assert stats.gen_tokens == len(oracle.tokens) and stats.prompt_tokens == len(tokens)
    assert stats.stop == ("eos" if len(oracle.tokens) < GREEDY.max_tokens else "length")
    assert stats.ttft > 0 and stats.ctx_used == stats.prompt_tokens + stats.gen_tokens and stats.ctx_total == 1024


def test_second_turn_reuses_the_cache(smol):
    b, _ = loaded(smol)
    b.load()
    try:
        reply, first = events(b, FRANCE)
        follow = FRANCE + [{"role": "assistant", "content": reply}, {"role": "user", "content": "And of Germany?"}]
        n_follow = len(prompt.encode(b.info.prompt, b.tokenizer, follow))
        _, second = events(b, follow, Sampling(max_tokens=16, temperature=0))
        assert second.cached_tokens >= first.prompt_tokens  # the whole first turn came from the KV cache
        assert second.prompt_tokens < n_follow - first.prompt_tokens + 8  # only the new part was evaluated
    finally:
        b.close()


def test_cancel_stops_a_reply_at_once(smol):
    b, _ = loaded(smol)
    b.load()
    try:
        story = prompt.encode(b.info.prompt, b.tokenizer, [{"role": "user", "content": "Write a very long story about a dragon."}])
        got = []
        for event in b.generate(story, Sampling(max_tokens=400, temperature=0.8, seed=3)):
            got.append(event)
            if len(got) == 5:
                threading.Thread(target=b.cancel).start()
        assert got[-1].stats.stop == "cancelled" and got[-1].stats.gen_tokens <= 9
        assert events(b, FRANCE)[0]  # the conversation can go on after a cancel
    finally:
        b.close()


def test_cancel_stops_the_prompt_being_evaluated(smol):
    """A long prompt is evaluated in batches of 512 tokens; a cancel stops it within one (llama.cpp's abort
    callback) instead of after all of them, and the KV cache stays coherent: the next reply, on the same
    long prompt, is the one from an empty cache."""
    b, _ = loaded(smol, ctx=2048)
    b.load()
    try:
        long = [{"role": "user", "content": "Summarise: " + "the quick brown fox jumps over the lazy dog. " * 150}]
        tokens = prompt.encode(b.info.prompt, b.tokenizer, long)
        assert len(tokens) > 1400  # seconds of prefill on two cores
        threading.Timer(0.1, b.cancel).start()
        *texts, done = b.generate(tokens, Sampling(max_tokens=8, temperature=0))
        assert done.stats.stop == "cancelled" and not texts
        assert done.stats.prompt_tokens < len(tokens) - 512  # stopped with batches of the prompt left
        text, stats = events(b, long, Sampling(max_tokens=8, temperature=0))
        assert stats.stop != "cancelled"
        b.engine.forget()
        fresh, _ = events(b, long, Sampling(max_tokens=8, temperature=0))
    finally:
        b.close()
    assert text == fresh  # the same batches either way (the cancel came between two), so the same logits


def test_a_prompt_longer_than_the_context(smol):
    b, _ = loaded(smol, ctx=256)
    b.load()
    try:
        with pytest.raises(ContextFull, match="the context holds 256"):
            events(b, [{"role": "user", "content": "word " * 400}])
    finally:
        b.close()


def test_measure(tiny_gguf):
    b, _ = loaded(tiny_gguf("Q4_K_M"), ctx=512)
    b.load()
    try:
        speed = b.measure(list(range(10, 74)), 8)
        assert speed.prefill_tps > 0 and speed.decode_tps > 0
    finally:
        b.close()


def test_a_file_llama_cpp_refuses_says_why(tmp_path):
    """A header that passes localmix's checks but not llama.cpp's (a tensor shape localmix does not
    check): the load fails with llama.cpp's own reason in one line, not "Failed to load model"."""
    m = base_model()
    t = next(t for t in m.tensors if t.name == "blk.0.attn_v.weight")
    t.shape, t.data = [32, 8], bytes(2 * 32 * 8)
    path = tmp_path / "v.gguf"
    path.write_bytes(serialise(m))
    b, _ = loaded(path, ctx=256)
    with pytest.raises(ModelFileError) as e:
        b.load()
    line = str(e.value)
    assert line.startswith(f"llama.cpp could not load {path}: ") and "\n" not in line
    assert "tensor 'blk.0.attn_v.weight' has wrong shape; expected 32, 16, got 32, 8" in line
