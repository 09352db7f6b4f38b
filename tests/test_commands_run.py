"""`localmix run` as a user runs it, on real models: the reply alone on stdout (llama.cpp's own greedy
continuation, compared in the same process), the prompt as the model reads it, constrained JSON printed
only when whole and valid, and tools through the call-and-answer loop."""

import json
import subprocess
import textwrap

import pytest

from localmix import prompt
from localmix.llamacpp import Engine
from localmix.model_info import read_model_info
from localmix.tools import load_tools
from tests.support.cli import one_line_error, run_cli
from tests.support.llm import greedy

GREEDY = ("--temperature", "0", "--threads", "2", "--ctx", "1024")


def tokens_of(path, messages, tools=None):
    vocab = Engine.vocab_only(path)
    try:
        return prompt.encode(read_model_info(path).prompt, vocab, messages, tools)
    finally:
        vocab.close()


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from localmix.demo import build_demo, source_gguf

    out = tmp_path_factory.mktemp("demo") / "demo.gguf"
    build_demo(source_gguf(), out)
    return out


def test_print_prompt_shows_the_system_prompt_where_the_model_reads_it(tiny_gguf, tiny_v1, tmp_path):
    """Mixtral 8x7B's template (v1 vocabulary) rejects a system role: it is folded into the first user
    message. A v3 vocabulary (8x22B) gets Mistral's own encoding, system prompt in the last user message."""
    from quantize.convert import convert

    v1 = tmp_path / "v1.gguf"
    convert(tiny_v1, v1, "Q8_0")
    r = run_cli("run", str(v1), "Hello", "--system", "Be brief.", "--print-prompt")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "<s> [INST] Be brief.\n\nHello [/INST]"  # the word-start space of "[" shows
    r = run_cli("run", str(tiny_gguf("Q4_K_M")), "Hello", "--system", "Be brief.", "--print-prompt")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "<s>[INST] Be brief.\n\nHello[/INST]"


def test_print_prompt_with_tools_is_the_text_of_the_tokens(tiny_gguf, smol):
    native = run_cli("run", str(tiny_gguf("Q4_K_M")), "What is 2+2?", "--tools", "--print-prompt")
    assert native.returncode == 0, native.stderr
    assert native.stdout.startswith('<s>[AVAILABLE_TOOLS] [{"type": "function", "function": {"name": "calculator"')
    assert native.stdout.endswith("[/AVAILABLE_TOOLS][INST] What is 2+2?[/INST]")
    protocol = run_cli("run", str(smol), "What is 2+2?", "--tools", "--print-prompt")
    assert protocol.returncode == 0 and '{"tool_calls": [' in protocol.stdout and "calculator" in protocol.stdout


def test_run_streams_only_the_reply_on_stdout(smol):
    question = "What is the capital of France?"
    r = run_cli("run", str(smol), question, "--max-tokens", "32", *GREEDY)
    assert r.returncode == 0, r.stderr
    oracle = greedy(smol, tokens_of(smol, [{"role": "user", "content": question}]), 32)
    assert r.stdout == oracle.text.lstrip(" ") + "\n" and oracle.text.strip()
    r = run_cli("run", str(smol), "Hi", "--max-tokens", "8", "--ctx", "1024", "--verbose", "--seed", "1")
    assert r.returncode == 0, r.stderr
    for key in ("plan: CPU only", "prompt eval rate:", "eval rate:", "time to first token:", "context:"):
        assert key in r.stderr


def test_a_split_model_runs_as_the_whole_file(tiny_gguf, tiny_split):
    whole = run_cli("run", str(tiny_gguf("Q4_K_M")), "Hello", "--max-tokens", "12", "--vram", "660M", *GREEDY)
    split = run_cli("run", str(tiny_split[1]), "Hello", "--max-tokens", "12", "--vram", "660M", *GREEDY)
    assert whole.returncode == 0 and split.returncode == 0, split.stderr
    assert split.stdout == whole.stdout


def test_json_schema_output_always_parses_and_validates(smol, tmp_path):
    import jsonschema

    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}, "country": {"type": "string", "maxLength": 30},
                                               "population_millions": {"type": "number"}},
              "required": ["city", "country", "population_millions"]}
    f = tmp_path / "schema.json"
    f.write_text(json.dumps(schema))
    for seed in (1, 2):
        r = run_cli("run", str(smol), "Describe Paris as JSON.", "--json-schema", str(f), "--seed", str(seed),
                    "--max-tokens", "200", "--ctx", "1024")
        assert r.returncode == 0, r.stderr
        jsonschema.validate(json.loads(r.stdout), schema)
    r = run_cli("run", str(smol), 'Reply with a JSON object with the keys "name" and "age" for a cat.', "--json",
                "--max-tokens", "120", *GREEDY)
    assert r.returncode == 0 and isinstance(json.loads(r.stdout), dict)


def test_a_cut_reply_is_reported_not_printed(smol, tmp_path):
    """A grammar cannot make a model stop: 30 tokens cannot hold 40 strings, and nothing reaches stdout."""
    f = tmp_path / "long.json"
    f.write_text(json.dumps({"type": "array", "items": {"type": "string", "minLength": 3}, "minItems": 40}))
    r = run_cli("run", str(smol), "List forty animals.", "--json-schema", str(f), "--max-tokens", "30", *GREEDY)
    assert one_line_error(r, "cut by --max-tokens") and r.stdout == ""
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"type": "object", "not": {}}))
    assert one_line_error(run_cli("run", str(smol), "x", "--json-schema", str(bad)), "cannot enforce")
    bad.write_text("{nope")
    assert one_line_error(run_cli("run", str(smol), "x", "--json-schema", str(bad)), "not JSON")


def tool_lines(stderr: str) -> list[tuple[str, dict, str]]:
    """(name, arguments, result) of each `tool: NAME(ARGS) -> RESULT` line."""
    out = []
    for line in stderr.splitlines():
        if line.startswith("tool: "):
            head, _, result = line.removeprefix("tool: ").partition(") -> ")
            name, _, args = head.partition("(")
            out.append((name, json.loads(args), result))
    return out


def test_the_demo_model_calls_the_calculator_and_answers_in_words(demo):
    """Forced by --tool-choice, under a grammar: whatever expression the model writes, the calculator's
    result for it goes back and the model answers in words."""
    r = run_cli("run", str(demo), "What is 12*7+3?", "--tools", "--tool-choice", "calculator", "--max-tokens", "128", *GREEDY)
    assert r.returncode == 0, r.stderr
    [(name, args, result)] = tool_lines(r.stderr)
    assert name == "calculator" and result == load_tools(entry_points=False).run({"name": name, "arguments": args})
    assert r.stdout.strip() and not r.stdout.lstrip().startswith(("{", "["))


def test_side_effect_tools_need_consent(demo, tmp_path):
    f = tmp_path / "notes.py"
    target = tmp_path / "note.txt"
    f.write_text(textwrap.dedent(f'''
        from typing import Annotated
        from localmix.tools import tool

        @tool(side_effects=True)
        def save_note(text: Annotated[str, {{"maxLength": 20}}]) -> str:
            """Save a note."""
            open({str(target)!r}, "w").write(text)
            return "saved"
    '''))
    args = ("run", str(demo), "Save a note saying hello.", "--tools", str(f), "--tool-choice", "save_note",
            "--max-tokens", "64", *GREEDY)
    r = run_cli(*args, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    assert "refused save_note" in r.stderr and not target.exists()
    r = run_cli(*args, "--yes")
    assert r.returncode == 0, r.stderr
    assert target.exists() and tool_lines(r.stderr)[0][0] == "save_note"


def test_a_result_too_big_for_json_reaches_the_model_as_an_error(demo, tmp_path):
    f = tmp_path / "big.py"
    f.write_text('def big_number() -> int:\n    """A very big number."""\n    return 9**9999\n')
    r = run_cli("run", str(demo), "Give me the big number.", "--tools", str(f), "--tool-choice", "big_number",
                "--max-tokens", "32", *GREEDY)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    [(name, _, result)] = tool_lines(r.stderr)
    assert name == "big_number" and json.loads(result)["error"].startswith("ValueError")


def test_native_mistral_tool_path_end_to_end(tiny_gguf):
    """A model with Mistral's tool tokens (the v3 vocabulary): the reply is forced to start with
    [TOOL_CALLS] and follow the calls grammar, so even random weights produce a call that parses; its
    result goes back as [TOOL_RESULTS] and the model then answers in words."""
    r = run_cli("run", str(tiny_gguf("Q4_K_M")), "What is 2+2?", "--tools", "--tool-choice", "calculator",
                "--max-tokens", "60", *GREEDY)
    assert r.returncode == 0, r.stderr
    [(name, args, _)] = tool_lines(r.stderr)
    assert name == "calculator" and isinstance(args["expression"], str)
    assert r.stdout.strip() and not r.stdout.startswith("[")


def test_flag_errors():
    assert one_line_error(run_cli("run", "x.gguf", "hi", "--tool-choice", "required"), "--tool-choice needs --tools")
    assert one_line_error(run_cli("run", "missing.gguf", "hi"), "no such model file")


def test_prompt_from_stdin_closed_empty_or_not_utf8(smol):
    """PROMPT '-' with stdin closed or empty is one line; bytes that are not UTF-8, in an argument or on
    stdin, become U+FFFD (as llama.cpp shows them) instead of failing to encode."""
    import os
    import sys

    closed = subprocess.run([sys.executable, "-m", "localmix", "run", str(smol), "-"], capture_output=True, text=True,
                            preexec_fn=lambda: os.close(0), timeout=600)
    assert one_line_error(closed, "stdin is closed"), closed.stderr
    empty = run_cli("run", str(smol), "-", input="  \n")
    assert one_line_error(empty, "stdin was empty"), empty.stderr

    bad = b"say hi \xff\xfe"
    from_stdin = subprocess.run([sys.executable, "-m", "localmix", "run", str(smol), "-", "--print-prompt"],
                                input=bad, capture_output=True, timeout=600)
    from_arg = subprocess.run([sys.executable, "-m", "localmix", "run", str(smol), bad, "--print-prompt"],
                              capture_output=True, timeout=600)
    for r in (from_stdin, from_arg):
        assert r.returncode == 0 and "say hi \ufffd\ufffd".encode() in r.stdout, r.stderr
    r = subprocess.run([sys.executable, "-m", "localmix", "run", str(smol), bad, "--max-tokens", "2", *GREEDY],
                       capture_output=True, timeout=600)
    assert r.returncode == 0 and r.stdout.strip(), r.stderr


def test_default_context_is_lowered_to_the_trained_one(tiny, tmp_path):
    """A model trained on 2048 tokens: without --ctx, the 4096 default becomes 2048 with a notice; an
    explicit --ctx above 2048 is refused."""
    import shutil

    from quantize.convert import convert

    short = tmp_path / "short-ctx"
    shutil.copytree(tiny, short)
    config = json.loads((short / "config.json").read_text())
    (short / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 2048}))
    model = tmp_path / "short.gguf"
    convert(short, model, "Q8_0")

    r = run_cli("run", str(model), "hi", "--max-tokens", "2", "--threads", "2", "--verbose")
    assert r.returncode == 0, r.stderr
    assert "context 2048 tokens, the longest this model was trained on" in r.stderr
    assert "of 2048 tokens" in r.stderr  # the context the reply ran in
    r = run_cli("run", str(model), "hi", "--ctx", "4096")
    assert one_line_error(r, "longer than the model's trained context (2048)"), r.stderr
