"""`localmix quantize SRC [-o OUT] [--type TYPE] [--imatrix auto|FILE] [--force]`: the CLI face of the
`quantize` package: resolve SRC, convert with a rich progress bar on stderr, print a summary on stdout.
With `--imatrix auto` the importance matrix is computed in torch during the pass (quantize.calibrate) and
saved beside the output as OUT-STEM.imatrix.gguf, in llama.cpp's format.

Mixed precision (`--bpw B`, or `--for VRAM,RAM [--tps N]`): every tensor's error at every candidate type is
measured on the weights (quantize.sensitivity), then a type is chosen per tensor on the Lagrangian frontier
(quantize.allocate) under bytes (--bpw) or under the planner's seconds per token on that machine
(localmix.tailor). `--type` names the uniform mix compared against (default Q4_K_M). With `--imatrix auto`
the calibration runs whole first, since the measurement needs its weights; the pass then uses them.
`--dry-run` prints the choice and writes nothing. The file records its target in localmix.target.* keys."""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

from .common import bandwidth, bounded, size, threads, tokens

# quantize.recipe.OUT_TYPES (a test holds them equal; importing the recipe here would load gguf for every command)
TYPES = ("Q4_K_M", "Q4_K_S", "Q4_0", "Q5_K_M", "Q6_K", "Q8_0", "BF16", "F16", "Q5_K_S", "Q3_K_L", "Q3_K_M", "Q3_K_S",
         "Q2_K", "IQ4_XS", "IQ4_NL", "IQ3_M", "IQ3_S", "IQ3_XXS", "IQ2_M")
TORCH_MISSING = "--imatrix auto needs torch: pipx inject localmix torch, or pip install 'localmix[calibrate]'"
calibration_tokens = bounded(int, 1, 1 << 30, "a token count")
bits_per_weight = bounded(float, 1.0, 32.0, "bits per weight")
tokens_per_second = bounded(float, 0.001, 1e6, "tokens per second")


def machine(text: str) -> tuple[int, int]:
    """argparse type for --for: 'VRAM,RAM' as two sizes, e.g. '12G,64G' or '0,32GiB'."""
    parts = text.split(",")
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"not VRAM,RAM: {text!r} (examples: 12G,64G; 0,32GiB)")
    return size(parts[0]), size(parts[1])


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
    mixed = p.add_argument_group("mixed precision: a type per tensor, compared against --type's uniform mix")
    mixed.add_argument("--bpw", type=bits_per_weight, metavar="B",
                       help="the least error at an average of B bits per weight (e.g. 4.5)")
    mixed.add_argument("--for", dest="for_", type=machine, metavar="VRAM,RAM",
                       help="the file for a machine with this GPU memory and RAM (e.g. 12G,64G; 0,32G for CPU only): "
                            "the fastest whose error stays at --type's, or the best that reaches --tps")
    mixed.add_argument("--tps", type=tokens_per_second, metavar="N", help="with --for: the decode speed (tokens/s) to reach")
    mixed.add_argument("--ctx", type=tokens, metavar="N", help="with --for: context length to plan for (default 4096)")
    mixed.add_argument("--kv-type", choices=("f16", "q8_0", "q4_0"), help="with --for: KV cache type (default f16)")
    mixed.add_argument("--ram-bandwidth", type=bandwidth, metavar="BW",
                       help="with --for: that machine's RAM read bandwidth, e.g. 80GB/s (default: this machine's)")
    mixed.add_argument("--dry-run", action="store_true", help="with --bpw or --for: print the choice, write nothing")


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
    check_target_flags(args)
    mixed = args.bpw is not None or args.for_ is not None
    if auto:
        _need_torch()
    folder, source = resolve(args.src, args.revision)
    if args.output:
        out = Path(args.output).expanduser()
    else:
        name = source.get("repo") or folder.resolve().name
        out = models_dir() / (mixed_name(name, args) if mixed else default_name(name, args.type))
    saved = imatrix_path(out) if auto else None
    if not args.dry_run:
        for path in (out, saved) if mixed else (saved,):  # mixed: before the measuring, not after
            if path is not None and path.exists() and not args.force:
                raise LocalmixError(f"{shown(path, 400)} already exists (use --force to overwrite)")

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

    choice = None
    with progress:
        importance = imatrix_file
        if auto:
            importance = _calibrator(folder, text, args.calibration_text, args.calibration_tokens, progress)
        try:
            if mixed:
                choice = choose(args, folder, source.get("repo") or folder.resolve().name, importance, progress)
            if not args.dry_run:
                s = convert(
                    folder, out, choice.file_type if choice else args.type, force=args.force, threads=args.threads,
                    source=source, on_start=on_start, on_tensor=on_tensor, on_bytes=on_bytes, on_stale=on_stale,
                    importance=importance, types=choice.types if choice else None, metadata=choice.metadata if choice else None,
                )
                if saved is not None:
                    write_imatrix(importance.imatrix(), saved)
        finally:
            if auto:
                importance.close()
    if args.dry_run:
        print("\n".join(choice.report), flush=True)
        return 0

    con = Console()
    hp = s.hparams
    table = Table(show_header=False, box=None, padding=(0, 2))
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    table.add_row("size", f"{fmt_bytes(s.file_bytes)} ({s.bits_per_weight:.2f} bits per weight)")
    kind = f"{hp.n_expert} experts, top-{hp.n_expert_used}" if hp.is_moe else "dense"
    table.add_row("model", f"{hp.arch}, {s.n_params / 1e9:.2f} B parameters, {hp.n_layer} layers, {kind}")
    table.add_row("tensors", ", ".join(f"{t} {n}" for t, n in sorted(s.types.items(), key=lambda kv: -kv[1])))
    for k, v in choice.rows if choice else ():
        table.add_row(k, v)
    if imatrix_file is not None:
        im = imatrix_file
        chunks = f", {im.chunk_count} chunks" if im.chunk_count else ""
        table.add_row("imatrix", f"{shown(args.imatrix, 200)} ({len(im.entries)} entries{chunks}): {s.with_importance} tensors weighted")
    if saved is not None:
        table.add_row("imatrix", f"computed from {importance.routing_tokens or '?'} tokens, {s.with_importance} tensors weighted; "
                                 f"saved to {shown(saved, 400)}")
    if choice is not None:  # the calibration and the measuring ran before the pass
        calib = f"calibration {fmt_duration(choice.calibration_seconds)}, " if auto else ""
        table.add_row("time", f"{fmt_duration(s.seconds + choice.seconds)} ({calib}measuring {fmt_duration(choice.measuring_seconds)})")
    else:
        calib = f" (calibration {fmt_duration(s.importance_seconds)})" if auto else ""
        table.add_row("time", fmt_duration(s.seconds) + calib)
    table.add_row("peak memory", fmt_bytes(s.peak_rss))
    con.print(f"[bold green]Wrote[/] {escape(str(s.path))}", soft_wrap=True)  # whole, for copy-paste
    con.print(table)
    con.print(_plan_summary(s.path, args), markup=False, highlight=False)
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
    """How the new file would run here (or on the machine --vram/--ram or --for describe)."""
    from ..loader import summary_here
    from ..model_info import read_model_info

    if args.for_ is not None:
        return f"On the machine it was made for: {_summary_for(read_model_info(path), args)}"
    where = "the given budget" if args.vram is not None or args.ram is not None else "this machine"
    return f"On {where} (context 4096): {summary_here(read_model_info(path), args.vram, args.ram)}"


# ---- mixed precision (--bpw, --for) --------------------------------------------------------------------

FOR_ONLY = (("--tps", "tps"), ("--ctx", "ctx"), ("--kv-type", "kv_type"), ("--ram-bandwidth", "ram_bandwidth"))


def check_target_flags(args: argparse.Namespace) -> None:
    """The mixed-precision flags' combinations, before anything is read."""
    from ..errors import LocalmixError

    if args.bpw is not None and args.for_ is not None:
        raise LocalmixError("--bpw and --for are two targets: give one")
    if args.for_ is None:
        for flag, attr in FOR_ONLY:
            if getattr(args, attr) is not None:
                raise LocalmixError(f"{flag} goes with --for VRAM,RAM")
    elif args.vram is not None or args.ram is not None:
        raise LocalmixError("--vram and --ram go without --for (--for VRAM,RAM is the machine)")
    if args.dry_run and args.bpw is None and args.for_ is None:
        raise LocalmixError("--dry-run goes with --bpw or --for")
    if args.type in ("BF16", "F16") and (args.bpw is not None or args.for_ is not None):
        raise LocalmixError(f"--type {args.type} is not a quantized mix to compare against: use one such as Q4_K_M")


def mixed_name(name: str, args: argparse.Namespace) -> str:
    """NAME-mixed-4.50bpw.gguf, NAME-for-12G-64G.gguf, NAME-for-0G-32G-8tps.gguf."""
    stem = name.replace("/", "--")
    if args.bpw is not None:
        return f"{stem}-mixed-{args.bpw:.2f}bpw.gguf"
    vram, ram = args.for_
    tps = f"-{args.tps:g}tps" if args.tps is not None else ""
    return f"{stem}-for-{_short_size(vram)}-{_short_size(ram)}{tps}.gguf"


def _short_size(n: int) -> str:
    from ..units import GiB

    return f"{n / GiB:.3g}G"


@dataclass
class Choice:
    """What the search chose, and how to tell it."""

    types: dict  # tensor name -> GGMLQuantizationType
    file_type: str  # general.file_type: the uniform mix nearest in size
    metadata: dict  # the localmix.target.* keys
    report: list[str]  # the dry run's text
    rows: list[tuple[str, str]]  # lines for the closing summary
    seconds: float = 0.0  # all of the choosing
    calibration_seconds: float = 0.0
    measuring_seconds: float = 0.0


def choose(args: argparse.Namespace, folder: Path, name: str, importance, progress) -> Choice:
    """Measure every tensor's error at every candidate type and choose a type per tensor for the target
    (`name`: the model's, for the report)."""
    from dataclasses import replace

    from quantize.calibrate import Calibrator
    from quantize.convert import check_importance, plan_tensors, planned
    from quantize.recipe import OUT_TYPES
    from quantize.sensitivity import estimate, measure

    from ..text import shown
    from ..units import fmt_bytes

    t0 = time.perf_counter()
    has_imatrix = importance is not None
    with planned(folder, args.type, has_imatrix) as (ck, hp, tensors):  # a target out of reach fails before the calibration
        n_params = sum(t.n_elements for t in tensors)
        if args.bpw is not None:
            _check_bpw(args.bpw, estimate(tensors, has_importance=has_imatrix), tensors, n_params)
        ctx = _check_ctx(args, hp)
    weights, routing = importance, None
    t_calibration = time.perf_counter()
    if isinstance(importance, Calibrator):
        weights = importance.imatrix()  # runs the whole calibration: the measurement needs every layer's weights
        routing = importance.routing()
    elif importance is not None:
        routing = imatrix_routing(importance, hp)
    t_measuring = time.perf_counter()
    with planned(folder, args.type, has_imatrix) as (ck, hp, tensors):
        check_importance(tensors, args.type, importance)
        task = progress.add_task("measuring", total=None, tensors="", layers=True, visible=False)

        def on_unit(i: int, n: int) -> None:
            progress.update(task, completed=i, total=n, tensors=f"{i}/{n} tensors", visible=True)

        units = measure(tensors, weights, routing=routing, threads=args.threads, on_unit=on_unit)
        progress.update(task, visible=False)
        measured = time.perf_counter()
        uniform_bytes = {name: sum(t.nbytes for t in plan_tensors(ck, hp, name, has_imatrix)) for name in OUT_TYPES}
    uniform = {t.name: t.type for t in tensors}
    reference = {u.name: uniform[u.name] for u in units}
    reference_error = _total_error(units, reference, args.type)
    target = (_by_bpw(args, units, tensors, n_params) if args.bpw is not None
              else _by_machine(args, hp, tensors, units, reference, ctx, name))
    mixed = [replace(t, type=target.types.get(t.name, t.type)) for t in tensors]
    mixed_bytes = sum(t.nbytes for t in mixed)
    used = {t.type for t in mixed}  # general.file_type: the nearest in size of the mixes based on a type the file uses
    file_type = min([n for n, o in OUT_TYPES.items() if o.base in used] or OUT_TYPES, key=lambda n: abs(uniform_bytes[n] - mixed_bytes))
    error = _total_error(units, target.types, "the choice")
    metadata = {"localmix.target.kind": target.kind, **target.metadata,
                "localmix.target.predicted_error": float(error), "localmix.target.reference_error": float(reference_error)}
    size_line = (f"{fmt_bytes(mixed_bytes)}, {mixed_bytes * 8 / n_params:.2f} bits per weight "
                 f"(uniform {args.type}: {fmt_bytes(uniform_bytes[args.type])}, {uniform_bytes[args.type] * 8 / n_params:.2f})")
    error_line = f"{error:.4g} mean KLD (uniform {args.type}: {reference_error:.4g}; {_change(error, reference_error)})"
    rows = [("target", f"{target.title} (uniform mix nearest in size: {file_type})"), ("estimated error", error_line),
            *target.rows]
    report = [f"{target.title}: {shown(name)}", "", *type_table(mixed), "",
              *_aligned([("size", size_line), ("estimated error", error_line), *target.rows,
                         ("file type", f"{file_type} (the uniform mix nearest in size)")]),
              "", "Dry run: nothing was written."]
    return Choice(target.types, file_type, metadata, report, rows, time.perf_counter() - t0,
                  t_measuring - t_calibration, measured - t_measuring)


@dataclass
class Target:
    """A target's choice: the types, its localmix.target.* keys and how to tell it."""

    kind: str  # "bpw" or "machine"
    types: dict
    metadata: dict
    title: str
    rows: list[tuple[str, str]]


def _check_bpw(bpw: float, units, tensors, n_params: int) -> None:
    """--bpw within what the ladder reaches for this model (every unit at its smallest or largest type)."""
    from ..errors import LocalmixError

    fixed = _fixed_bytes(units, tensors)
    low = (fixed + sum(u.options[0].nbytes for u in units)) * 8 / n_params
    high = (fixed + sum(u.options[-1].nbytes for u in units)) * 8 / n_params
    if not low <= bpw <= high:
        raise LocalmixError(f"--bpw {bpw:g} is out of reach for this model: it takes from {low:.2f} to {high:.2f} bits per weight"
                            + ("" if any(u.options[0].type.name.startswith("IQ") for u in units)
                               else " (an importance matrix, --imatrix auto, allows fewer)"))


def _fixed_bytes(units, tensors) -> int:
    """Bytes of the tensors the search leaves alone (norms, routers, rope_freqs)."""
    names = {u.name for u in units}
    return sum(t.nbytes for t in tensors if t.name not in names)


def _check_ctx(args: argparse.Namespace, hp) -> int | None:
    from ..errors import LocalmixError
    from ..units import DEFAULT_CTX

    if args.for_ is None:
        return None
    if args.ctx is not None and args.ctx > hp.n_ctx:
        raise LocalmixError(f"--ctx {args.ctx} is longer than the model's trained context ({hp.n_ctx})")
    return args.ctx or min(DEFAULT_CTX, hp.n_ctx)


def imatrix_routing(im, hp):
    """Routing counts [n_layer, n_expert] from an imatrix file's expert entries (the tokens each expert's
    gate matrix saw), or None (a dense model, a legacy file, or entries missing)."""
    import numpy as np

    if not hp.is_moe or getattr(im, "legacy", True):
        return None
    rows = []
    for i in range(hp.n_layer):
        e = im.entries.get(f"blk.{i}.ffn_gate_exps.weight")
        if e is None or e.counts.shape != (hp.n_expert,):
            return None
        rows.append(e.counts)
    return np.stack(rows).astype(np.uint64)


def _total_error(units, types: dict, what: str) -> float:
    from quantize.sensitivity import total_error

    from ..errors import LocalmixError

    try:
        return total_error(units, types)
    except KeyError as e:
        raise LocalmixError(f"{what} is not a mix the search can compare against ({e.args[0]}): use one such as Q4_K_M") from None


def _by_bpw(args: argparse.Namespace, units, tensors, n_params: int) -> Target:
    from quantize.allocate import by_bytes

    types = by_bytes(units, int(args.bpw * n_params / 8) - _fixed_bytes(units, tensors))
    return Target("bpw", types, {"localmix.target.bpw": float(args.bpw)}, f"Mixed precision at {args.bpw:g} bits per weight", [])


def _by_machine(args: argparse.Namespace, hp, tensors, units, reference: dict, ctx: int, name: str) -> Target:
    """The types for the machine --for describes, decided with its plan (localmix.tailor)."""
    import numpy as np

    from ..describe import summary_line
    from ..errors import DoesNotFit
    from ..hardware import DECODE_READ_EFFICIENCY
    from ..loader import machine_and_budget
    from ..planner import plan
    from ..tailor import info_from_plan, tailor
    from ..units import fmt_bytes

    vram, ram = args.for_
    kv_type = args.kv_type or "f16"
    _, budget = machine_and_budget(vram, ram, args.ram_bandwidth)
    read = args.ram_bandwidth or budget.cpu_bandwidth / DECODE_READ_EFFICIENCY  # what --ram-bandwidth reproduces it with
    base = info_from_plan(hp, tensors, name)
    t = tailor(base, units, reference, budget, ctx, kv_type, args.tps)
    try:
        uniform = f"{plan(base, budget, ctx, kv_type).decode_tps:.1f} tok/s"
    except DoesNotFit:
        uniform = "does not fit"
    machine = f"{f'GPU {fmt_bytes(vram)}' if vram else 'no GPU'}, RAM {fmt_bytes(ram)}"
    asked = f", {args.tps:g} tok/s" if args.tps is not None else ""
    rows = [("machine", f"{machine}, RAM read {read / 1e9:.1f} GB/s, context {ctx}, {kv_type} KV cache"),
            ("plan", summary_line(t.info, t.plan)),
            ("predicted decode", f"{t.plan.decode_tps:.1f} tok/s" + (f" (asked for {args.tps:g})" if args.tps is not None else "")
             + f"; uniform {args.type}: {uniform}")]
    metadata = {"localmix.target.vram": int(vram), "localmix.target.ram": int(ram), "localmix.target.ram_bandwidth": float(read),
                "localmix.target.ctx": np.uint32(ctx), "localmix.target.tps": float(args.tps or 0.0),
                "localmix.target.predicted_decode_tps": float(t.plan.decode_tps)}
    return Target("machine", t.types, metadata, f"Mixed precision for {machine}{asked}", rows)


def _summary_for(info, args: argparse.Namespace) -> str:
    """The plan of a file on the machine --for describes, at its context."""
    from ..describe import summary_line
    from ..errors import DoesNotFit
    from ..loader import machine_and_budget
    from ..planner import plan

    _, budget = machine_and_budget(*args.for_, args.ram_bandwidth)
    ctx = min(args.ctx or 4096, info.n_ctx_train)
    try:
        return f"(context {ctx}) " + summary_line(info, plan(info, budget, ctx, args.kv_type or "f16"))
    except DoesNotFit as e:
        return str(e)


# Columns of the dry run's table, in a layer's order; kinds not listed follow.
KINDS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down", "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")


def type_table(tensors) -> list[str]:
    """The chosen types per layer and tensor kind, a run of layers with the same types as one row, then
    the whole-model tensors (token_embd, output)."""
    from quantize.sensitivity import is_unit

    layers: dict[int, dict[str, str]] = {}
    whole: list[tuple[str, str]] = []
    for t in tensors:
        if not is_unit(t):
            continue
        parts = t.name.split(".")
        if t.name.startswith("blk.") and len(parts) > 2 and parts[1].isdigit():
            layers.setdefault(int(parts[1]), {})[parts[2]] = t.type.name
        else:
            whole.append((t.name.removesuffix(".weight"), t.type.name))
    seen = {k for row in layers.values() for k in row}
    kinds = [k for k in KINDS if k in seen] + sorted(seen - set(KINDS))
    runs: list[list] = []  # [first, last, types]
    for i in sorted(layers):
        row = tuple(layers[i].get(k, "-") for k in kinds)
        if runs and runs[-1][2] == row and runs[-1][1] == i - 1:
            runs[-1][1] = i
        else:
            runs.append([i, i, row])
    table = [("layers", *kinds)] + [(str(a) if a == b else f"{a}-{b}", *row) for a, b, row in runs]
    widths = [max(len(r[c]) for r in table) for c in range(len(table[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in table]
    return lines + _aligned(whole)


def _aligned(pairs) -> list[str]:
    width = max((len(k) for k, _ in pairs), default=0)
    return [f"{k.ljust(width)}  {v}" for k, v in pairs]


def _change(error: float, reference: float) -> str:
    if reference <= 0 or abs(error / reference - 1) < 0.005:
        return "the same"
    pct = (error / reference - 1) * 100
    return f"{abs(pct):.0f}% {'lower' if pct < 0 else 'higher'}"
