"""`localmix list [--json]`: the models in the store; a damaged or incomplete one (a link to a deleted
file, a link loop, a folder named like a model) is listed as broken, with the reason, never as a model
that would load. Partial downloads are not models: the table only counts them in a footnote. Names and
paths come from the file system and are shown escaped (localmix.text)."""

from __future__ import annotations

import argparse
import json


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true",
                   help="as JSON: name, path, files, bytes, type, parameters, experts, experts_used, context, error")


def rows() -> list[dict]:
    from quantize.errors import Error

    from ..model_info import model_info
    from ..models import stored_models

    out = []
    for m in stored_models():
        row = {"name": m.name, "path": str(m.path), "files": len(m.files), "bytes": m.size,
               "type": "?", "parameters": 0, "experts": 0, "experts_used": 0, "context": 0, "error": m.error}
        if m.model is not None:
            try:
                info = model_info(m.model)
                row.update(type=info.file_type, parameters=info.n_params, experts=info.n_expert,
                           experts_used=info.n_expert_used, context=info.n_ctx_train)
            except Error as e:
                row["error"] = str(e)
        out.append(row)
    return out


def partials_line() -> str | None:
    """A footnote on partial downloads waiting to be resumed, if there are any."""
    from ..hub import PARTIAL_DIR
    from ..paths import models_dir
    from ..text import shown

    folder = models_dir() / PARTIAL_DIR
    try:
        sizes = [p.stat().st_size for p in folder.iterdir() if p.name.endswith(".partial") and p.is_file()]
    except OSError:
        return None
    if not sizes:
        return None
    return (f"{len(sizes)} partial download(s), {sum(sizes) / 2**30:.1f} GiB, in {shown(folder, 1000)}: "
            "the next pull of each resumes it; one left for a week is removed by the next pull")


def run(args: argparse.Namespace) -> int:
    from ..paths import models_dir
    from ..text import markup, shown

    data = rows()
    if args.json:
        print(json.dumps(data, indent=1))
        return 0
    from rich.console import Console
    from rich.table import Table

    con = Console()
    if not data:
        con.print(f"No models in {markup(models_dir(), 1000)}. Get one: localmix pull bartowski/Mixtral-8x7B-Instruct-v0.1-GGUF")
        return 0
    t = Table(box=None, header_style="bold")
    for col in ("NAME", "TYPE", "SIZE", "PARAMS", "EXPERTS", "CONTEXT", "PATH"):
        t.add_column(col, no_wrap=col != "PATH", overflow="fold" if col == "PATH" else "ellipsis",
                     justify="right" if col in ("SIZE", "PARAMS", "CONTEXT") else "left")
    for r in data:
        experts = f"{r['experts']}x, top-{r['experts_used']}" if r["experts"] > 1 else "-"
        kind = "[red]broken[/]" if r["error"] else markup(r["type"])
        t.add_row(markup(r["name"]), kind, f"{r['bytes'] / 2**30:.1f} GiB",
                  f"{r['parameters'] / 1e9:.2f} B" if r["parameters"] else "?", experts, str(r["context"] or "?"),
                  markup(r["path"], 1000))
    con.print(t)
    for r in data:
        if r["error"]:
            con.print(f"{shown(r['name'])} is broken: {shown(r['error'], 400)}", markup=False, highlight=False)
    if line := partials_line():
        con.print(line, markup=False, highlight=False)
    return 0
