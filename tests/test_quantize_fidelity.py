"""The converted files run in real llama.cpp and compute what the model computes in transformers."""

import numpy as np
import pytest

from tests.support.checkpoints import mistral_tokenizer_file
from tests.support.llm import greedy
from tests.support.llm import logits as llama_logits
from tests.support.reference import MIXED_TEXT
from tests.support.reference import hf_logits as hf_logits_of

MULTILINGUAL = [
    "The quick brown fox jumps over the lazy dog.",
    "Le cœur déçu mais l'âme plutôt naïve, Louÿs rêva de crapaüter en canoë.",
    "Falsches Üben von Xylophonmusik quält jeden größeren Zwerg.",
    "Qué pingüino tan ñoño; perché è così?",
    "def f(x):\n    return {'a': [1, 2, 3]}  # 12345\n\tprint(x)",
    "東京は日本の首都です。北京是中国的首都。🚀 emoji ✅ 🦙",
]


def hf_logits(folder, tokens):
    return hf_logits_of("MixtralForCausalLM", folder, tokens)


@pytest.fixture(scope="module")
def upcycled_tokens(upcycled):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(upcycled).encode(MIXED_TEXT, add_special_tokens=False)


@pytest.fixture(scope="module")
def bf16_logits(upcycled_gguf, upcycled_tokens):
    return llama_logits(upcycled_gguf("BF16"), upcycled_tokens)


def test_bf16_logits_match_transformers(upcycled, bf16_logits, upcycled_tokens):
    ref = hf_logits(upcycled, upcycled_tokens)
    assert ref.shape == bf16_logits.shape and len(upcycled_tokens) > 100
    top1 = np.mean(ref.argmax(-1) == bf16_logits.argmax(-1))
    corr = np.corrcoef(ref.ravel(), bf16_logits.ravel())[0, 1]
    print(f"BF16 vs transformers: top-1 agreement {top1:.4f}, correlation {corr:.6f}")
    assert top1 >= 0.98
    assert corr > 0.999


def test_q4_k_m_keeps_top1_of_bf16(upcycled_gguf, bf16_logits, upcycled_tokens):
    q4 = llama_logits(upcycled_gguf("Q4_K_M"), upcycled_tokens)
    top1 = np.mean(q4.argmax(-1) == bf16_logits.argmax(-1))
    print(f"Q4_K_M vs BF16: top-1 agreement {top1:.4f}")
    assert top1 >= 0.75


PARIS_PROMPT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\nThe capital of France is"


def test_q4_k_m_still_knows_paris(upcycled_gguf):
    """The answer's deciding token, with a margin no kernel difference can flip (measured: 4.7 logits at
    Q4_K_M; near-ties elsewhere in the reply are not asserted)."""
    path = upcycled_gguf("Q4_K_M")
    tokens = _llama_tokens(path, PARIS_PROMPT, special=True)
    answer = greedy(path, tokens, 1)
    assert answer.text == " Paris" and answer.margins[0] > 2.0, (answer.text, answer.margins)


def test_random_mixtral_logits_match_transformers(tiny, tiny_gguf):
    """The permutation of q/k rows, expert stacking and an untied output, on random weights (4 heads,
    2 KV heads). Random layers amplify bf16 rounding more than a trained model does (measured: 0.9993
    correlation, 98% top-1), hence the looser bounds than for the upcycled model."""
    tokens = list(range(1, 300, 3))
    ref = hf_logits(tiny, tokens)
    got = llama_logits(tiny_gguf("BF16"), tokens)
    assert np.corrcoef(ref.ravel(), got.ravel())[0, 1] > 0.998
    assert np.mean(ref.argmax(-1) == got.argmax(-1)) >= 0.95


def _llama_tokens(gguf_path, text, special=False):
    from llama_cpp import Llama

    llm = Llama(str(gguf_path), vocab_only=True, verbose=False)
    try:
        return llm.tokenize(text.encode(), add_bos=False, special=special)
    finally:
        llm.close()


@pytest.mark.parametrize("text", MULTILINGUAL)
def test_bpe_tokenization_matches_hugging_face(upcycled, upcycled_gguf, text):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(upcycled).encode(text, add_special_tokens=False)
    assert _llama_tokens(upcycled_gguf("Q4_K_M"), text) == hf


@pytest.mark.parametrize("version", ["v1", "v3"])
def test_sentencepiece_tokenization_matches_mistral_and_hugging_face(version, tiny, tiny_v1, tmp_path):
    """Mixtral 8x7B's v1 and 8x22B's v3 tokenizers: llama.cpp against Mistral's own tokenizer
    (mistral-common) and transformers' LlamaTokenizer built from the same tokenizer.model."""
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
    from transformers import LlamaTokenizer

    from quantize.convert import convert

    folder = tiny if version == "v3" else tiny_v1
    out = tmp_path / "vocab.gguf"
    convert(folder, out, "Q8_0")
    # mistral-common reads the tokenizer version from the file name (.v1, .v3)
    mistral = MistralTokenizer.from_file(str(mistral_tokenizer_file(version))).instruct_tokenizer.tokenizer
    hf = LlamaTokenizer.from_pretrained(folder)
    for text in MULTILINGUAL + ["  two leading spaces\nand\n\nnewlines"]:
        ours = _llama_tokens(out, text)
        assert ours == mistral.encode(text, bos=False, eos=False), text
        # transformers' converted SentencePiece tokenizer splits runs of spaces (code indentation,
        # leading spaces) differently from sentencepiece itself; llama.cpp follows sentencepiece.
        if "  " not in text:
            assert ours == hf.encode(text, add_special_tokens=False), text
