"""`localmix run MODEL PROMPT`: one reply, streamed to stdout as plain text (nothing else on stdout, so
it pipes). `--print-prompt` shows the exact prompt the model's template makes; `--verbose` adds the plan
and timings on stderr, like `ollama run --verbose`."""

from __future__ import annotations

import argparse
import sys

from .common import add_budget_arguments


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="a GGUF file, or a model name in the store (localmix list)")
    p.add_argument("prompt", metavar="PROMPT", help="the user message ('-' reads it from stdin)")
    p.add_argument("--system", help="system prompt")
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=None)
    add_budget_arguments(p)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: physical cores)")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json-schema", metavar="FILE", help="constrain the reply to JSON valid under this schema")
    out.add_argument("--json", action="store_true", help="constrain the reply to a JSON object")
    out.add_argument("--tools", nargs="*", metavar="FILE",
                     help="let the model call tools: the built-in ones, installed ones, and those in FILE(s)")
    p.add_argument("--tool-choice", default="auto", metavar="auto|required|NAME",
                   help="with --tools: let the model decide (auto), or force a call (required, or of tool NAME)")
    p.add_argument("--yes", action="store_true", help="with --tools: run tools that have side effects without asking")
    p.add_argument("--print-prompt", action="store_true", help="print the rendered prompt and exit")
    p.add_argument("--verbose", action="store_true", help="plan and timings on stderr")


def _messages(args) -> list[dict]:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    msgs = [{"role": "system", "content": args.system}] if args.system else []
    return msgs + [{"role": "user", "content": prompt}]


def run(args: argparse.Namespace) -> int:
    import time

    from ..backends import ContextFull, Sampling
    from ..chat_template import TemplateError
    from ..errors import UserError
    from ..model_info import read_model_info
    from .common import load_plan, summary_line

    messages = _messages(args)
    toolset = _toolset(args)
    schema = _schema(args)
    if args.print_prompt:
        from ..models import resolve_model

        info = read_model_info(resolve_model(args.model))
        sys.stdout.write(_prompt_text(info, messages, toolset))
        return 0

    from ..backends.llama import LlamaBackend

    t0 = time.perf_counter()
    info, hw, budget, plan = load_plan(args)
    if args.verbose:
        print(f"plan: {summary_line(info, plan)}", file=sys.stderr)
    backend = LlamaBackend(info, plan, ctx=args.ctx, kv_type=args.kv_type, threads=args.threads or hw.cores)
    try:
        backend.load()
    except (ValueError, RuntimeError) as e:  # llama-cpp-python's way of saying the load failed
        raise UserError(f"llama.cpp could not load {args.model}: {e}") from None
    t_load = time.perf_counter() - t0
    sampling = Sampling(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    try:
        if toolset is not None:
            sys.stdout.write(_with_tools(backend, messages, toolset, sampling, args))
        else:
            grammar = None
            if schema is not None:
                from ..tools.grammar import grammar_for

                grammar = grammar_for(schema)
            pieces = []
            for piece in backend.stream(messages, sampling, grammar=grammar):
                pieces.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
            if schema is not None:
                from ..tools.grammar import validate

                validate("".join(pieces), schema)
    except (ContextFull, TemplateError) as e:
        raise UserError(str(e)) from None
    except KeyboardInterrupt:
        backend.cancel()
        raise
    finally:
        backend.close()
    sys.stdout.write("\n")
    if args.verbose:
        s = backend.stats
        total = time.perf_counter() - t0
        print(
            f"total duration:       {total:.2f}s\n"
            f"load duration:        {t_load:.2f}s\n"
            f"prompt eval count:    {s.prompt_tokens} token(s) ({s.cached_tokens} cached)\n"
            f"prompt eval duration: {s.prompt_seconds:.3f}s\n"
            f"prompt eval rate:     {s.prompt_tps:.2f} tokens/s\n"
            f"eval count:           {s.gen_tokens} token(s)\n"
            f"eval duration:        {s.gen_seconds:.3f}s\n"
            f"eval rate:            {s.gen_tps:.2f} tokens/s (predicted {plan.decode_tps:.2f})\n"
            f"time to first token:  {s.ttft:.3f}s\n"
            f"context:              {s.ctx_used} of {s.ctx_total} tokens",
            file=sys.stderr,
        )
    return 0


def _toolset(args):
    if args.tools is None:
        if args.tool_choice != "auto":
            from ..errors import UserError

            raise UserError("--tool-choice needs --tools")
        return None
    from ..tools import load_tools

    return load_tools(args.tools)


def _schema(args):
    import json

    from ..errors import UserError
    from ..tools.grammar import ANY_JSON_OBJECT, check_schema

    if args.json:
        return ANY_JSON_OBJECT
    if not args.json_schema:
        return None
    try:
        with open(args.json_schema, encoding="utf-8") as f:
            schema = json.load(f)
    except OSError as e:
        raise UserError(f"--json-schema {args.json_schema}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise UserError(f"--json-schema {args.json_schema}: not JSON ({e.msg}, line {e.lineno})") from None
    check_schema(schema)
    return schema


def _prompt_text(info, messages, toolset) -> str:
    """The prompt as the model will see it, without loading the model."""
    from ..chat_template import TemplateError, render
    from ..errors import UserError
    from ..tools.loop import protocol_messages
    from ..tools.mistral import render_text

    if toolset is not None and info.native_tools:
        return render_text(messages, toolset.specs())
    if toolset is not None:
        messages = protocol_messages(messages, toolset.specs())
    try:
        return render(info.chat_template, messages, bos=info.bos_text, eos=info.eos_text)
    except TemplateError as e:
        raise UserError(str(e)) from None


def _with_tools(backend, messages, toolset, sampling, args) -> str:
    import json

    from ..errors import UserError
    from ..tools.loop import ToolLoopError, run_tools
    from ..tools.mistral import ToolCallError

    def confirm(call) -> bool:
        if args.yes:
            return True
        if not sys.stdin.isatty():
            print(f"refused {call['name']}: it has side effects (pass --yes to allow)", file=sys.stderr)
            return False
        answer = input(f"Run {call['name']}({json.dumps(call['arguments'])})? It has side effects. [y/N] ")
        return answer.strip().lower() in ("y", "yes")

    def show(call, result) -> None:
        print(f"tool: {call['name']}({json.dumps(call['arguments'], ensure_ascii=False)}) -> {result}", file=sys.stderr)

    try:
        return run_tools(backend, messages, toolset, sampling, choice=args.tool_choice, confirm=confirm, on_call=show)
    except (ToolLoopError, ToolCallError) as e:
        raise UserError(str(e)) from None
