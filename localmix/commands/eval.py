"""`localmix eval MODEL --reference REF [--text FILE] [--ctx N] [--chunks N] [--json]`: how far MODEL's
next-token distributions drift from REF's (mean KLD and its uncertainty, median and 99th percentile,
same top token, RMS change of the actual token's probability, both perplexities), as llama-perplexity's
KL-divergence mode reports it. Progress on stderr, the table (or --json) on stdout."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .common import add_threads_argument, bounded

MAX_TEXT = 1 << 30  # bytes of --text read (a text file of a gigabyte is not a text a user means)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="the GGUF to measure (a file, or a model name in the store)")
    p.add_argument("--reference", "-r", metavar="REF", required=True,
                   help="what it is measured against: a GGUF (usually the BF16 or Q8_0 of the same model), or the "
                        "Hugging Face checkpoint (folder or repo id; runs in torch)")
    p.add_argument("--text", metavar="FILE", help="UTF-8 text to evaluate on (default: the built-in evaluation text)")
    p.add_argument("--ctx", type=bounded(int, 16, 1 << 20, "a context length"), default=512,
                   help="tokens per chunk (default 512); the second half of each chunk is scored")
    p.add_argument("--chunks", type=bounded(int, 1, 1 << 20, "a chunk count"), default=20,
                   help="at most this many chunks of the text (default 20)")
    add_threads_argument(p)
    p.add_argument("--json", action="store_true", help="all the numbers as JSON")


def reference(spec: str):
    """REF to an evaluate.Reference: a folder is a checkpoint; a hub repo id without :QUANT is the
    checkpoint on the hub (fetched as quantize fetches it); anything else is a GGUF (a path, a store name,
    or REPO:QUANT in the store)."""
    from quantize.hub import REPO_ID, resolve

    from ..evaluate import Reference
    from ..models import resolve_model

    path = Path(spec).expanduser()
    if path.is_dir():
        return Reference("checkpoint", path, spec)
    if not path.exists() and REPO_ID.match(spec) and not spec.endswith(".gguf"):
        folder, _ = resolve(spec)
        return Reference("checkpoint", folder, spec)
    return Reference("gguf", resolve_model(spec), spec)


def read_text(arg: str | None) -> str:
    from ..errors import LocalmixError
    from ..text import shown

    if arg is None:
        from quantize.texts import eval_text

        return eval_text()
    try:
        with open(Path(arg).expanduser(), "rb") as f:
            data = f.read(MAX_TEXT + 1)
    except OSError as e:
        raise LocalmixError(f"cannot read --text {shown(arg)}: {e.strerror or e}") from None
    if len(data) > MAX_TEXT:
        raise LocalmixError(f"--text {shown(arg)} is over {MAX_TEXT >> 30} GiB; give a shorter text")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise LocalmixError(f"--text {shown(arg)} is not UTF-8 text (byte {e.start})") from None


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from ..evaluate import evaluate
    from .common import open_model

    model = open_model(args.model)
    ref = reference(args.reference)
    text = read_text(args.text)
    err = Console(stderr=True)
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        TimeRemainingColumn(), console=err, transient=True)
    tasks: dict[str, int] = {}
    names = {"reference": "reference (once, then cached)", "model": "model"}

    def on_progress(stage: str, done: int, total: int) -> None:
        if stage not in tasks:
            tasks[stage] = progress.add_task(names[stage], total=total)
        progress.update(tasks[stage], completed=done, total=total)

    with progress:
        result = evaluate(model, ref, text, ctx=args.ctx, chunks=args.chunks, threads=args.threads, progress=on_progress)
    if result.chunks < args.chunks:
        err.print(f"localmix eval: the text holds {result.chunks} chunks of {args.ctx} tokens (of the {args.chunks} asked for)",
                  markup=False, highlight=False)
    if args.json:
        print(json.dumps(result.as_dict(), indent=1))
    else:
        Console().print(table(result))
    return 0


def _pm(e, scale: float = 1.0, digits: int = 6, unit: str = "") -> str:
    return f"{e.value * scale:.{digits}f} ± {e.uncertainty * scale:.{digits}f}{unit}"


def table(r):
    """The results as llama-perplexity's closing statistics, in one table."""
    from rich.table import Table

    from ..text import markup

    s = r.summary
    t = Table(title=f"{markup(Path(r.model).name)} against {markup(r.reference.label)}", title_justify="left", show_header=False,
              box=None, padding=(0, 2))
    t.add_column(style="bold")
    t.add_column(justify="right")
    rows = [
        ("mean KLD", _pm(s.kld)),
        ("median KLD", f"{s.kld_median:.6f}"),
        ("99% KLD", f"{s.kld_p99:.6f}"),
        ("max KLD", f"{s.kld_max:.6f}"),
        ("same top token", _pm(s.same_top, 100, 3, " %")),
        ("RMS Δp", _pm(s.rms_p_diff, 100, 3, " %")),
        ("PPL (model)", _pm(s.ppl, digits=4)),
        ("PPL (reference)", _pm(s.ppl_ref, digits=4)),
        ("ln(PPL ratio)", _pm(s.ln_ppl_ratio)),
        ("scored", f"{s.count} positions: {r.chunks} chunks of {r.ctx} tokens, second halves"),
        ("reference", "from the cache" if r.cache_reused else f"computed in {r.reference_seconds:.1f} s, cached"),
        ("model", f"{r.model_seconds:.1f} s"),
    ]
    for name, value in rows:
        t.add_row(name, value)
    return t
