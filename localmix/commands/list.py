"""`localmix list [--json]`: the models in the store."""

from __future__ import annotations

import argparse
import json


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="as JSON: name, type, bytes, parameters, experts, experts_used, context, path")


def rows() -> list[dict]:
    from ..errors import UserError
    from ..model_info import read_model_info
    from ..models import stored_models

    out = []
    for m in stored_models():
        row = {"name": m.name, "path": str(m.path), "bytes": m.size, "parts": len(m.parts)}
        try:
            info = read_model_info(m.path)
            row.update(type=info.file_type, parameters=sum(t.n_elements for t in info.tensors),
                       experts=info.n_expert, experts_used=info.n_expert_used, context=info.n_ctx_train, error=None)
        except UserError as e:  # a broken file is listed, with what is wrong, not skipped
            row.update(type="?", parameters=0, experts=0, experts_used=0, context=0, error=str(e))
        out.append(row)
    return out


def run(args: argparse.Namespace) -> int:
    from ..paths import models_dir

    data = rows()
    if args.json:
        print(json.dumps(data, indent=1))
        return 0
    from rich.console import Console
    from rich.table import Table

    con = Console()
    if not data:
        con.print(f"No models in {models_dir()}. Make one: localmix quantize mistralai/Mixtral-8x7B-Instruct-v0.1")
        return 0
    t = Table(box=None, header_style="bold")
    for col in ("NAME", "TYPE", "SIZE", "PARAMS", "EXPERTS", "CONTEXT", "PATH"):
        t.add_column(col, no_wrap=col != "PATH", justify="right" if col in ("SIZE", "PARAMS", "CONTEXT") else "left")
    for r in data:
        experts = f"{r['experts']}x, top-{r['experts_used']}" if r["experts"] > 1 else "-"
        t.add_row(r["name"], r["type"] if not r["error"] else "[red]broken[/]", f"{r['bytes'] / 2**30:.1f} GiB",
                  f"{r['parameters'] / 1e9:.2f} B" if r["parameters"] else "?", experts, str(r["context"] or "?"), r["path"])
    con.print(t)
    return 0
