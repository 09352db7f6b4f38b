"""`localmix quantize SRC [-o OUT] [--type TYPE] [--imatrix auto|FILE] [--force]`: the CLI face of the
`quantize` package: resolve SRC, convert with a rich progress bar on stderr, print a summary on stdout.
With `--imatrix auto` the importance matrix is computed in torch during the pass (quantize.calibrate) and
saved beside the output as OUT-STEM.imatrix.gguf, in llama.cpp's format."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import bounded, size, threads

# quantize.recipe.OUT_TYPES (a test holds them equal; importing the recipe here would load gguf for every command)
TYPES = ("Q4_K_M", "Q4_K_S", "Q4_0", "Q5_K_M", "Q6_K", "Q8_0", "BF16", "F16", "Q5_K_S", "Q3_K_L", "Q3_K_M", "Q3_K_S",
         "Q2_K", "IQ4_XS", "IQ4_NL", "IQ3_M", "IQ3_S", "IQ3_XXS", "IQ2_M")
TORCH_MISSING = "--imatrix auto needs torch: pipx inject localmix torch, or pip install 'localmix[calibrate]'"
calibration_tokens = bounded(int, 1, 1 << 30, "a token count")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", metavar="SRC", help="checkpoint folder, or hub repo id like mistralai/Mixtral-8x7B-Instruct-v0.1")
    p.add_argument("-o", "--output", metavar="OUT", help="GGUF file to write (default: NAME-TYPE.gguf in the model store)")
    p.add_argument("--type", default="Q4_K_M", type=str.upper, choices=TYPES, help="output type (default Q4_K_M)")
    p.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    p.add_argument("--revision", help="hub revision (branch, tag or commit) when SRC is a repo id")
    p.add_argument("--threads", type=threads, default=None, help="quantization threads (default: all cores)")
    p.add_argument("--imatrix", metavar="auto|FILE",
                   help="importance matrix: 'auto' computes one from the checkpoint in torch during the pass (saved beside "
                        "OUT as .imatrix.gguf); FILE is llama.cpp's (GGUF or .dat, from llama-imatrix)")
    p.add_argument("--calibration-text", metavar="FILE", help="with --imatrix auto: your own calibration text (default: built in)")
    p.add_argument("--calibration-tokens", type=calibration_tokens, metavar="N",
                   help="with --imatrix auto: use at most N tokens of the calibration text")
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
    from quantize.imatrix import read_imatrix, write_imatrix

    from ..errors import LocalmixError
    from ..paths import models_dir
    from ..text import shown
    from ..units import fmt_bytes, fmt_duration

    err = Console(stderr=True)
    if args.output == "":
        raise LocalmixError("-o needs a file name")
    auto = args.imatrix is not None and args.imatrix.lower() == "auto"
    if (args.calibration_text is not None or args.calibration_tokens is not None) and not auto:
        raise LocalmixError("--calibration-text and --calibration-tokens go with --imatrix auto")
    if args.imatrix == "":
        raise LocalmixError("--imatrix needs 'auto' or a file name")
    imatrix_file = None if args.imatrix is None or auto else read_imatrix(Path(args.imatrix).expanduser())
    if imatrix_file is not None:
        imatrix_file.source = args.imatrix  # as given, as llama-quantize records it
    text = _calibration_text(Path(args.calibration_text).expanduser()) if args.calibration_text is not None else None
    if auto:
        _need_torch()
    folder, source = resolve(args.src, args.revision)
    if args.output:
        out = Path(args.output).expanduser()
    else:
        name = source.get("repo") or folder.resolve().name
        out = models_dir() / default_name(name, args.type)
    saved = imatrix_path(out) if auto else None
    if saved is not None and saved.exists() and not args.force:
        raise LocalmixError(f"{shown(saved, 400)} already exists (use --force to overwrite)")

    class Bytes(DownloadColumn):  # the calibration's task counts layers, not bytes
        def render(self, task):
            return "" if task.fields.get("layers") else super().render(task)

    class Speed(TransferSpeedColumn):
        def render(self, task):
            return "" if task.fields.get("layers") else super().render(task)

    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[tensors]}"),
        Bytes(binary_units=True),
        Speed(),
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
        importance = imatrix_file
        if auto:
            importance = _calibrator(folder, text, args.calibration_text, args.calibration_tokens, progress)
        try:
            s = convert(
                folder, out, args.type, force=args.force, threads=args.threads, source=source,
                on_start=on_start, on_tensor=on_tensor, on_bytes=on_bytes, on_stale=on_stale, importance=importance,
            )
            if saved is not None:
                write_imatrix(importance.imatrix(), saved)
        finally:
            if auto:
                importance.close()

    con = Console()
    hp = s.hparams
    table = Table(show_header=False, box=None, padding=(0, 2))
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    table.add_row("size", f"{fmt_bytes(s.file_bytes)} ({s.bits_per_weight:.2f} bits per weight)")
    kind = f"{hp.n_expert} experts, top-{hp.n_expert_used}" if hp.is_moe else "dense"
    table.add_row("model", f"{hp.arch}, {s.n_params / 1e9:.2f} B parameters, {hp.n_layer} layers, {kind}")
    table.add_row("tensors", ", ".join(f"{t} {n}" for t, n in sorted(s.types.items(), key=lambda kv: -kv[1])))
    if imatrix_file is not None:
        im = imatrix_file
        chunks = f", {im.chunk_count} chunks" if im.chunk_count else ""
        table.add_row("imatrix", f"{shown(args.imatrix, 200)} ({len(im.entries)} entries{chunks}): {s.with_importance} tensors weighted")
    if saved is not None:
        table.add_row("imatrix", f"computed from {importance.routing_tokens or '?'} tokens, {s.with_importance} tensors weighted; "
                                 f"saved to {shown(saved, 400)}")
    calib = f" (calibration {fmt_duration(s.importance_seconds)})" if auto else ""
    table.add_row("time", fmt_duration(s.seconds) + calib)
    table.add_row("peak memory", fmt_bytes(s.peak_rss))
    con.print(f"[bold green]Wrote[/] {escape(str(s.path))}", soft_wrap=True)  # whole, for copy-paste
    con.print(table)
    con.print(_plan_summary(s.path, args), markup=False)
    return 0


def imatrix_path(out: Path) -> Path:
    """Where `--imatrix auto` saves what it computed: beside OUT, OUT-STEM.imatrix.gguf."""
    return out.with_name(f"{out.name.removesuffix('.gguf')}.imatrix.gguf")


def _calibration_text(path: Path) -> str:
    from ..errors import LocalmixError
    from ..text import shown

    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise LocalmixError(f"calibration text {shown(path, 400)} is not UTF-8 text") from None
    except OSError as e:
        raise LocalmixError(f"cannot read calibration text {shown(path, 400)}: {e.strerror or e}") from None
    if not text.strip():
        raise LocalmixError(f"calibration text {shown(path, 400)} is empty")
    return text


def _need_torch() -> None:
    """Before anything is downloaded or written: the calibration runs in torch (an optional extra)."""
    from ..errors import LocalmixError

    try:
        import torch  # noqa: F401 - imported here to fail early; the calibration uses it
    except ImportError:
        raise LocalmixError(TORCH_MISSING) from None


def _calibrator(folder: Path, text: str | None, text_file: str | None, max_tokens: int | None, progress):
    """quantize.calibrate's Calibrator, with a line of progress for the layers it runs (in the pass)."""
    from quantize.calibrate import Calibrator

    from ..errors import LocalmixError

    task = progress.add_task("calibrating", total=None, tensors="", layers=True, visible=False)

    def on_layer(i: int, n: int) -> None:
        progress.update(task, completed=i + 1, total=n, tensors=f"layer {i + 1}/{n}", visible=True)

    try:
        cal = Calibrator(folder, text, max_tokens=max_tokens, on_layer=on_layer, dataset=text_file)
    except ImportError as e:  # torch (or a part of it) missing after all
        raise LocalmixError(f"{TORCH_MISSING} ({e})") from None
    progress.update(task, completed=0, total=cal.n_layer, tensors=f"layer 0/{cal.n_layer}", visible=True)
    return cal


def _plan_summary(path: Path, args: argparse.Namespace) -> str:
    """How the new file would run here (or on the machine --vram/--ram describe)."""
    from ..loader import summary_here
    from ..model_info import read_model_info

    where = "the given budget" if args.vram is not None or args.ram is not None else "this machine"
    return f"On {where} (context 4096): {summary_here(read_model_info(path), args.vram, args.ram)}"
