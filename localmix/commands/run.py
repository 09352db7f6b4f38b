"""`localmix run MODEL PROMPT`: one reply, streamed to stdout as plain text (nothing else on stdout, so
it pipes). `--print-prompt` shows the exact prompt the model's template makes; `--verbose` adds the plan
and timings on stderr, like `ollama run --verbose`."""

from __future__ import annotations

import argparse
import sys

from .common import add_budget_arguments


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="path to a GGUF file")
    p.add_argument("prompt", metavar="PROMPT", help="the user message ('-' reads it from stdin)")
    p.add_argument("--system", help="system prompt")
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=None)
    add_budget_arguments(p)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: physical cores)")
    p.add_argument("--print-prompt", action="store_true", help="print the rendered prompt and exit")
    p.add_argument("--verbose", action="store_true", help="plan and timings on stderr")


def _messages(args) -> list[dict]:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    msgs = [{"role": "system", "content": args.system}] if args.system else []
    return msgs + [{"role": "user", "content": prompt}]


def run(args: argparse.Namespace) -> int:
    import time

    from ..backends import ContextFull, Sampling
    from ..chat_template import TemplateError, render
    from ..errors import UserError
    from ..model_info import read_model_info
    from .common import load_plan, summary_line

    messages = _messages(args)
    if args.print_prompt:
        info = read_model_info(args.model)
        try:
            sys.stdout.write(render(info.chat_template, messages, bos=info.bos_text, eos=info.eos_text))
        except TemplateError as e:
            raise UserError(str(e)) from None
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
        for piece in backend.stream(messages, sampling):
            sys.stdout.write(piece)
            sys.stdout.flush()
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
