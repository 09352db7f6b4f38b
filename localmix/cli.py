"""`localmix COMMAND ...`: one module per command under localmix/commands, imported only when run,
so `localmix --help` stays fast (no llama.cpp, numpy or torch at start-up)."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from . import __version__

# command -> (module under localmix.commands, one-line help)
COMMANDS = {
    "chat": ("chat", "chat in the terminal (opens the demo model when no model is given or stored)"),
    "run": ("run", "stream one reply from a GGUF model to stdout"),
    "serve": ("serve", "serve a model behind an OpenAI-compatible API (/v1/chat/completions, streaming, tools, JSON output)"),
    "plan": ("plan", "show where each tensor of a GGUF goes (GPU or CPU) and the predicted speed"),
    "bench": ("bench", "measure prefill and decode speed of the auto plan against llama.cpp's usual splits"),
    "quantize": ("quantize", "Hugging Face checkpoint (folder or repo id) to a 4-bit GGUF in one streaming pass"),
    "pull": ("pull", "fetch a model from the Hugging Face hub into the store (GGUF, or safetensors to quantize)"),
    "list": ("list", "list the models in the store"),
    "eval": ("eval", "measure how far a quantized GGUF drifts from its reference (KL divergence, as llama-perplexity)"),
    "info": ("info", "show what a model holds and how it would run here"),
    "rm": ("rm", "remove a model from the store"),
    "worker": ("worker", "serve this machine's CPU and GPUs to other localmix instances (their --rpc HOST:PORT)"),
}


class Parser(argparse.ArgumentParser):
    """argparse, with a usage error as one line (argparse prints the whole usage first); status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="localmix", description="Run Mixtral-class MoE models on one desktop: GPU + RAM + CPU.")
    p.add_argument("--version", action="version", version=f"localmix {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        sp.set_defaults(_module=module)
        _arguments(module)(sp)
    return p


def _arguments(module: str):
    # Each command module keeps its top level import-light: heavy imports happen inside `run`.
    return importlib.import_module(f"localmix.commands.{module}").add_arguments


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    from quantize.errors import Error

    # The one place where expected failures become a line on stderr and an exit status.
    try:
        code = importlib.import_module(f"localmix.commands.{args._module}").run(args) or 0
        sys.stdout.flush()  # a reader that went away shows here, not at exit as "Exception ignored"
        return code
    except Error as e:
        print(f"localmix {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"localmix {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`localmix list | head`): nothing more to say
        # As Python's documentation advises and rich does for its own writes: status 1, nothing on stderr.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
