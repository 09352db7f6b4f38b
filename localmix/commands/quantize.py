"""`localmix quantize SRC [-o OUT] [--type TYPE] [--force]`: the CLI face of the `quantize` package:
resolve SRC, convert with a rich progress bar on stderr, print a summary on stdout."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import size, threads

TYPES = ("Q4_K_M", "Q4_K_S", "Q4_0", "Q5_K_M", "Q6_K", "Q8_0", "BF16", "F16")  # quantize.recipe.OUT_TYPES


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", metavar="SRC", help="checkpoint folder, or hub repo id like mistralai/Mixtral-8x7B-Instruct-v0.1")
    p.add_argument("-o", "--output", metavar="OUT", help="GGUF file to write (default: NAME-TYPE.gguf in the model store)")
    p.add_argument("--type", default="Q4_K_M", type=str.upper, choices=TYPES, help="output type (default Q4_K_M)")
    p.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    p.add_argument("--revision", help="hub revision (branch, tag or commit) when SRC is a repo id")
    p.add_argument("--threads", type=threads, default=None, help="quantization threads (default: all cores)")
    p.add_argument("--vram", type=size, metavar="SIZE", help="for the closing plan summary: GPU memory to plan for")
    p.add_argument("--ram", type=size, metavar="SIZE", help="for the closing plan summary: RAM to plan for")


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.markup import escape
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )
    from rich.table import Table

    from quantize.convert import convert, default_name
    from quantize.hub import resolve

    from ..errors import LocalmixError
    from ..paths import models_dir
    from ..text import shown
    from ..units import fmt_bytes, fmt_duration

    err = Console(stderr=True)
    if args.output == "":
        raise LocalmixError("-o needs a file name")
    folder, source = resolve(args.src, args.revision)
    if args.output:
        out = Path(args.output).expanduser()
    else:
        name = source.get("repo") or folder.resolve().name
        out = models_dir() / default_name(name, args.type)

    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[tensors]}"),
        DownloadColumn(binary_units=True),
        TransferSpeedColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=True,
    )
    state = {"done": 0, "n": 0}
    task = progress.add_task(f"{args.type}", total=None, tensors="", visible=False)

    def on_start(n_tensors: int, total: int) -> None:
        state["n"] = n_tensors
        progress.update(task, total=total, tensors=f"0/{n_tensors} tensors", visible=True)

    def on_tensor(name: str, nbytes: int) -> None:
        state["done"] += 1
        progress.update(task, tensors=f"{state['done']}/{state['n']} tensors")

    def on_bytes(n: int) -> None:
        progress.advance(task, n)

    def on_stale(r) -> None:  # one line each; the space is the news
        err.print(f"localmix quantize: removed a partial file left by an interrupted quantize (pid {r.pid}, "
                  f"{fmt_bytes(r.size)}): {shown(r.path, 400)}", markup=False, highlight=False, soft_wrap=True)

    with progress:
        s = convert(
            folder, out, args.type, force=args.force, threads=args.threads, source=source,
            on_start=on_start, on_tensor=on_tensor, on_bytes=on_bytes, on_stale=on_stale,
        )

    con = Console()
    hp = s.hparams
    table = Table(show_header=False, box=None, padding=(0, 2))
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    table.add_row("size", f"{fmt_bytes(s.file_bytes)} ({s.bits_per_weight:.2f} bits per weight)")
    kind = f"{hp.n_expert} experts, top-{hp.n_expert_used}" if hp.is_moe else "dense"
    table.add_row("model", f"{hp.arch}, {s.n_params / 1e9:.2f} B parameters, {hp.n_layer} layers, {kind}")
    table.add_row("tensors", ", ".join(f"{t} {n}" for t, n in sorted(s.types.items(), key=lambda kv: -kv[1])))
    table.add_row("time", fmt_duration(s.seconds))
    table.add_row("peak memory", fmt_bytes(s.peak_rss))
    con.print(f"[bold green]Wrote[/] {escape(str(s.path))}", soft_wrap=True)  # whole, for copy-paste
    con.print(table)
    con.print(_plan_summary(s.path, args), markup=False)
    return 0


def _plan_summary(path: Path, args: argparse.Namespace) -> str:
    """How the new file would run here (or on the machine --vram/--ram describe)."""
    from ..loader import summary_here
    from ..model_info import read_model_info

    where = "the given budget" if args.vram is not None or args.ram is not None else "this machine"
    return f"On {where} (context 4096): {summary_here(read_model_info(path), args.vram, args.ram)}"
