"""`localmix run MODEL PROMPT`: one reply, streamed to stdout as plain text (nothing else on stdout, so
it pipes). With --json or --json-schema the reply is printed only once it is whole and valid. With
--tools the calls and their results go to stderr and the final answer to stdout. `--print-prompt` shows
the prompt as the model will read it; `--verbose` adds the plan and timings on stderr, like
`ollama run --verbose`."""

from __future__ import annotations

import argparse
import json
import sys
import time

from .common import add_budget_arguments, add_repack_argument, add_threads_argument, bounded, tokens


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="a GGUF file, or a model name in the store (localmix list)")
    p.add_argument("prompt", metavar="PROMPT", help="the user message ('-' reads it from stdin)")
    p.add_argument("--system", help="system prompt")
    p.add_argument("--max-tokens", type=tokens, default=512, help="at most this many tokens of reply (default 512)")
    p.add_argument("--temperature", type=bounded(float, 0.0, 100.0, "a temperature"), default=0.7,
                   help="0 = greedy (default 0.7)")
    p.add_argument("--top-p", type=bounded(float, 0.0, 1.0, "a probability"), default=0.95, help="(default 0.95)")
    p.add_argument("--seed", type=int, default=None)
    add_budget_arguments(p)
    add_threads_argument(p)
    add_repack_argument(p)
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json-schema", metavar="FILE", help="constrain the reply to JSON valid under this schema")
    out.add_argument("--json", action="store_true", help="constrain the reply to a JSON object")
    out.add_argument("--tools", nargs="*", metavar="FILE",
                     help="let the model call tools: the built-in ones, installed ones, and those in FILE(s)")
    p.add_argument("--tool-choice", default="auto", metavar="auto|required|NAME",
                   help="with --tools: let the model decide (auto), or force a call (required, or of tool NAME)")
    p.add_argument("--yes", action="store_true", help="with --tools: run tools that have side effects without asking")
    p.add_argument("--print-prompt", action="store_true", help="print the prompt as the model will read it, and exit")
    p.add_argument("--verbose", action="store_true", help="plan and timings on stderr")


def messages(system: str | None, prompt: str) -> list[dict]:
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]


def run(args: argparse.Namespace) -> int:
    from ..backends import Done, Sampling, Text, ToolCalls, ToolResult
    from ..describe import summary_line
    from ..loader import load
    from ..reply import reply
    from ..text import terminal_safe
    from .common import open_model, planned

    toolset, schema = _toolset(args), _schema(args)
    prompt = _stdin_prompt() if args.prompt == "-" else _text(args.prompt)
    msgs = messages(_text(args.system) if args.system else None, prompt)
    if args.print_prompt:
        from ..modelfile import open_model_file

        sys.stdout.write(_prompt_text(open_model_file(open_model(args.model)), msgs, toolset))
        return 0

    t0 = time.perf_counter()
    p = planned(args)
    _prompt_text(p.model, msgs, toolset)  # a chat template that fails says so now, not after minutes of loading
    if args.verbose:
        print(f"plan: {summary_line(p.info, p.plan)}", file=sys.stderr)
    backend = load(p, threads=args.threads, repack=args.repack)
    t_load = time.perf_counter() - t0
    sampling = Sampling(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    grammar = None
    if schema is not None:
        from ..tools.grammar import grammar_for

        grammar = grammar_for(schema)
    # Printed as it comes, except what must be whole first: constrained JSON (validated before it is
    # printed) and each round of a tool conversation (a round may turn out to be a call).
    hold = schema is not None or toolset is not None
    # A model's reply is text from a file too: on a terminal its control characters are shown, not obeyed.
    show = terminal_safe if sys.stdout.isatty() else str
    pieces, stats = [], None
    try:
        for event in reply(backend, msgs, sampling, toolset=toolset, choice=args.tool_choice, grammar=grammar,
                           confirm=lambda call: _confirm(call, args.yes)):
            if isinstance(event, Text):
                pieces.append(event.text)
                if not hold:
                    sys.stdout.write(show(event.text))
                    sys.stdout.flush()
            elif isinstance(event, ToolCalls):
                pieces = []  # what came before was the call
            elif isinstance(event, ToolResult):
                call = event.call
                print(f"tool: {call['name']}({json.dumps(call['arguments'], ensure_ascii=False)}) -> {event.result}",
                      file=sys.stderr)
            elif isinstance(event, Done):
                stats = event.stats
    except KeyboardInterrupt:
        backend.cancel()
        raise
    finally:
        backend.close()
    text = "".join(pieces)
    if schema is not None:
        from ..tools.grammar import validate

        validate(text, schema)
    if hold:
        sys.stdout.write(show(text))
    sys.stdout.write("\n")
    if args.verbose and stats is not None:
        _print_timings(stats, time.perf_counter() - t0, t_load, p.plan.decode_tps, getattr(backend, "threads_now", None))
    return 0


def _text(arg: str) -> str:
    """A command-line argument as text: bytes that are not UTF-8 (Python keeps them as lone surrogates)
    become U+FFFD, as llama.cpp would show them, instead of failing to encode later."""
    return arg.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _stdin_prompt() -> str:
    """PROMPT '-': all of stdin, decoded leniently; a closed or empty stdin is an error, not an empty turn."""
    from ..errors import LocalmixError

    stream = getattr(sys.stdin, "buffer", None)
    try:
        data = stream.read() if stream is not None else None
    except (OSError, ValueError):  # fd 0 closed, or stdin is a closed file object
        data = None
    if data is None:
        raise LocalmixError("PROMPT '-' reads the prompt from stdin, but stdin is closed")
    text = data.decode("utf-8", "replace")
    if not text.strip():
        raise LocalmixError("PROMPT '-' reads the prompt from stdin, but stdin was empty")
    return text


def _print_timings(s, total: float, t_load: float, predicted: float, threads=None) -> None:
    if threads is not None:  # the choice made for this reply (an isolated backend's child keeps its own)
        print(f"threads:              {threads.describe()}", file=sys.stderr)
    print(
        f"total duration:       {total:.2f}s\n"
        f"load duration:        {t_load:.2f}s\n"
        f"prompt eval count:    {s.prompt_tokens} token(s) ({s.cached_tokens} cached)\n"
        f"prompt eval duration: {s.prompt_seconds:.3f}s\n"
        f"prompt eval rate:     {s.prompt_tps:.2f} tokens/s\n"
        f"eval count:           {s.gen_tokens} token(s)\n"
        f"eval duration:        {s.gen_seconds:.3f}s\n"
        f"eval rate:            {s.gen_tps:.2f} tokens/s (predicted {predicted:.2f})\n"
        f"time to first token:  {s.ttft:.3f}s\n"
        f"context:              {s.ctx_used} of {s.ctx_total} tokens",
        file=sys.stderr,
    )


def _confirm(call: dict, yes: bool) -> bool:
    if yes:
        return True
    if not sys.stdin.isatty():
        print(f"refused {call['name']}: it has side effects (pass --yes to allow)", file=sys.stderr)
        return False
    answer = input(f"Run {call['name']}({json.dumps(call['arguments'])})? It has side effects. [y/N] ")
    return answer.strip().lower() in ("y", "yes")


def _toolset(args):
    from ..errors import LocalmixError

    if args.tools is None:
        if args.tool_choice != "auto":
            raise LocalmixError("--tool-choice needs --tools")
        return None
    from ..tools import load_tools

    return load_tools(args.tools)


def _schema(args):
    from ..errors import LocalmixError
    from ..tools.grammar import ANY_JSON_OBJECT, check_schema

    if args.json:
        return ANY_JSON_OBJECT
    if not args.json_schema:
        return None
    try:
        with open(args.json_schema, encoding="utf-8") as f:
            schema = json.load(f)
    except OSError as e:
        raise LocalmixError(f"--json-schema {args.json_schema}: {e.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LocalmixError(f"--json-schema {args.json_schema}: not JSON ({e})") from None
    except RecursionError:  # json's decoder recurses once per level: a file nested 100,000 deep
        raise LocalmixError(f"--json-schema {args.json_schema}: nested too deeply to read") from None
    check_schema(schema)
    return schema


def _prompt_text(mf, msgs: list[dict], toolset) -> str:
    """The text of the tokens the model will evaluate, read from its vocabulary (no weights loaded)."""
    from .. import prompt
    from ..loader import vocabulary
    from ..model_info import model_info

    vocab = vocabulary(mf)
    try:
        tokens = prompt.encode(model_info(mf).prompt, vocab, msgs, toolset.specs() if toolset else None)
        return prompt.text_of(vocab, tokens)
    finally:
        vocab.close()
