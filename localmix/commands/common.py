"""What several commands share: the budget flags, MODEL arguments (asking to pull a hub model that is
not in the store: only commands ask questions), and reading and planning a model from the flags."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..units import DEFAULT_CTX, parse_bandwidth, parse_size


def size(text: str) -> int:
    """argparse type for SIZE flags."""
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def bandwidth(text: str) -> float:
    """argparse type for --ram-bandwidth."""
    try:
        return parse_bandwidth(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def sizes(text: str) -> tuple[int, ...]:
    """argparse type for SIZE[,SIZE...] flags (one per --rpc endpoint, or one for all)."""
    return tuple(size(x) for x in text.split(","))


def endpoints(text: str) -> tuple[str, ...]:
    """argparse type for --rpc HOST:PORT[,HOST:PORT...]."""
    from quantize.errors import Error

    from ..rpc import parse_endpoints

    try:
        return parse_endpoints(text)
    except Error as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def bounded(kind, low, high, what: str):
    """argparse type: a `kind` (int or float) in [low, high]; nan and inf are not numbers a user means."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {what}: {text!r}") from None
        if not low <= value <= high:  # also false for nan
            raise argparse.ArgumentTypeError(f"{text} is out of range: {what} from {low} to {high}")
        return value

    return parse


MAX_THREADS = 512  # GGML_MAX_N_THREADS
threads = bounded(int, 1, MAX_THREADS, "a thread count")
tokens = bounded(int, 1, 1 << 24, "a token count")
ubatch = bounded(int, 1, 1 << 16, "a micro-batch size")
# Commands whose default context is planner.default_context (a conversation grows: the longest context that
# costs little decode speed); run, bench and plan keep DEFAULT_CTX: one prompt, comparable measurements.
AUTO_CONTEXT_COMMANDS = ("chat", "serve")


def add_threads_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=threads, default=None,
                   help="CPU threads (default: the cores other programs leave free, checked at each reply)")


def add_repack_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-repack", dest="repack", action="store_false",
                   help="keep the CPU's weights as stored, as a worker does (llama.cpp's --no-repack: slower here, "
                        "but the same sums as experts on workers)")


def add_budget_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--vram", type=size, metavar="SIZE", help="GPU memory to plan for (default: free VRAM found; 0 = CPU only)")
    p.add_argument("--ram", type=size, metavar="SIZE", help="RAM to plan for (default: available RAM)")
    p.add_argument("--ctx", type=tokens, default=None,
                   help=f"context length in tokens (default {DEFAULT_CTX}, or the model's trained context if shorter; chat and serve: "
                        "the longest that keeps predicted decode within 10%% of its best)")
    p.add_argument("--ubatch", type=ubatch, default=None, metavar="N",
                   help="tokens per micro-batch of prompt processing (llama.cpp's -ub; default: the plan's choice, "
                        "larger with experts in RAM and VRAM to spare)")
    p.add_argument("--kv-type", default="f16", choices=("f16", "q8_0", "q4_0"), help="KV cache type (default f16)")
    p.add_argument("--ram-bandwidth", type=bandwidth, metavar="BW",
                   help="RAM read bandwidth of the machine to plan for, e.g. 80GB/s (default: this machine's, measured)")
    p.add_argument("--measure", action="store_true",
                   help="measure this machine's memory bandwidth (and the workers' links) again (forget the cached probes)")
    add_rpc_arguments(p)


NETWORK_NAMES = ("loopback", "10gbe", "1gbe")  # planner.NETWORKS' keys (a test checks), without importing it for --help


def add_rpc_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("workers (llama.cpp's RPC backend: experts in other computers' memory)")
    g.add_argument("--rpc", type=endpoints, default=(), metavar="HOST:PORT[,...]",
                   help="`localmix worker`s to place experts on when local memory cannot hold them or when it is faster")
    g.add_argument("--rpc-ram", type=sizes, metavar="SIZE[,SIZE...]",
                   help="plan for the workers' RAM (one size per --rpc endpoint, or one for all) without contacting them")
    g.add_argument("--rpc-vram", type=sizes, metavar="SIZE[,SIZE...]", help="likewise for the workers' GPU memory")
    g.add_argument("--rpc-network", choices=NETWORK_NAMES,
                   help="the network to the workers (default: measured; 1gbe for workers planned with --rpc-ram/--rpc-vram)")
    g.add_argument("--rpc-bandwidth", type=bandwidth, metavar="BW",
                   help="the workers' RAM read bandwidth, e.g. 80GB/s (default: measured, or this machine's)")


def rpc_options(args: argparse.Namespace) -> dict:
    """The worker flags as loader.prepare's keywords; a worker flag without --rpc is a mistake said so."""
    if not args.rpc:
        given = [flag for flag, value in (("--rpc-ram", args.rpc_ram), ("--rpc-vram", args.rpc_vram),
                                          ("--rpc-network", args.rpc_network), ("--rpc-bandwidth", args.rpc_bandwidth)) if value]
        if given:
            from ..errors import LocalmixError

            raise LocalmixError(f"{given[0]} describes workers: give them with --rpc HOST:PORT[,...]")
    return {"rpc": args.rpc, "rpc_ram": args.rpc_ram, "rpc_vram": args.rpc_vram, "rpc_network": args.rpc_network,
            "rpc_bandwidth": args.rpc_bandwidth}


def ask(question: str) -> bool:
    """A yes/no question in a terminal (Enter means yes); False when there is no terminal to ask in."""
    if not sys.stdin.isatty():
        return False
    return input(f"{question} [Y/n] ").strip().lower() in ("", "y", "yes")


def open_model(spec: str) -> Path:
    """A MODEL argument to the file to open: a path, a store name, or a hub REPO[:QUANT], pulled after
    asking when it is not in the store yet."""
    from ..errors import NotInStore
    from ..models import resolve_model

    try:
        return resolve_model(spec)
    except NotInStore as e:
        if not ask(f"{e.repo} ({e.quant}) is not in the store. Pull it now?"):
            raise
        from ..hub import pull

        return pull(e.repo, e.quant, say=lambda line: print(f"localmix: {line}", file=sys.stderr))


def planned(args: argparse.Namespace):
    """The MODEL argument read and planned with the budget flags (a loader.Planned)."""
    from ..loader import prepare

    rpc = rpc_options(args)
    p = prepare(open_model(args.model), vram=args.vram, ram=args.ram, ctx=args.ctx, kv_type=args.kv_type,
                ram_bandwidth=args.ram_bandwidth, measure=args.measure, ubatch=args.ubatch,
                auto_context=args.command in AUTO_CONTEXT_COMMANDS, **rpc)
    for note in p.notes:
        print(f"localmix {args.command}: {note}", file=sys.stderr)
    return p
