"""`localmix list [--json]`: the models in the store; a damaged or incomplete one is listed as broken,
with the reason, never as a model that would load."""

from __future__ import annotations

import argparse
import json


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true",
                   help="as JSON: name, path, files, bytes, type, parameters, experts, experts_used, context, error")


def rows() -> list[dict]:
    from ..errors import ModelFileError
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
            except ModelFileError as e:
                row["error"] = str(e)
        out.append(row)
    return out


def run(args: argparse.Namespace) -> int:
    from ..paths import models_dir

    data = rows()
    if args.json:
        print(json.dumps(data, indent=1))
        return 0
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    con = Console()
    if not data:
        con.print(f"No models in {escape(str(models_dir()))}. Get one: localmix pull bartowski/Mixtral-8x7B-Instruct-v0.1-GGUF")
        return 0
    t = Table(box=None, header_style="bold")
    for col in ("NAME", "TYPE", "SIZE", "PARAMS", "EXPERTS", "CONTEXT", "PATH"):
        t.add_column(col, no_wrap=col != "PATH", overflow="fold" if col == "PATH" else "ellipsis",
                     justify="right" if col in ("SIZE", "PARAMS", "CONTEXT") else "left")
    for r in data:
        experts = f"{r['experts']}x, top-{r['experts_used']}" if r["experts"] > 1 else "-"
        kind = "[red]broken[/]" if r["error"] else escape(r["type"])
        t.add_row(escape(r["name"]), kind, f"{r['bytes'] / 2**30:.1f} GiB",
                  f"{r['parameters'] / 1e9:.2f} B" if r["parameters"] else "?", experts, str(r["context"] or "?"),
                  escape(r["path"]))
    con.print(t)
    for r in data:
        if r["error"]:
            con.print(f"{r['name']} is broken: {r['error']}", markup=False, highlight=False)
    return 0
