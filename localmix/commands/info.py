"""`localmix info MODEL [--json]`: what a GGUF holds: metadata, tensor types and their share of the file,
expert layout, chat template and tool support, and how it would run here."""

from __future__ import annotations

import argparse
import json


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="a GGUF file, or a model name in the store (localmix list)")
    p.add_argument("--json", action="store_true", help="as JSON")


def describe(info) -> dict:
    from ..gguf_header import read_header

    kv, _ = read_header(info.path)  # the few keys ModelInfo does not keep
    total = info.weight_bytes or 1
    types: dict[str, int] = {}
    for t in info.tensors:
        types[t.type] = types.get(t.type, 0) + t.nbytes
    template = info.chat_template or ""
    expert_bytes = sum(t.nbytes for t in info.tensors if t.role == "expert")
    return {
        "path": info.path, "name": info.name, "architecture": info.arch, "type": info.file_type,
        "parameters": sum(t.n_elements for t in info.tensors), "bytes": info.weight_bytes,
        "layers": info.n_layer, "embedding": info.n_embd, "heads": info.n_head, "kv_heads": info.n_head_kv,
        "experts": info.n_expert, "experts_used": info.n_expert_used, "expert_bytes": expert_bytes,
        "context": info.n_ctx_train, "vocabulary": info.n_vocab, "tokenizer": kv.get("tokenizer.ggml.model"),
        "rope_base": kv.get(f"{info.arch}.rope.freq_base"),
        "tensor_types": {k: {"bytes": v, "share": v / total} for k, v in sorted(types.items(), key=lambda kv_: -kv_[1])},
        "chat_template": template,
        "tools": "native (Mistral [AVAILABLE_TOOLS]/[TOOL_CALLS])" if info.native_tools
                 else "in the chat template" if "tool" in template else "JSON protocol (localmix)",
        "source": kv.get("general.source.huggingface.repository"),
        "quantized_by": kv.get("general.quantized_by"),
    }


def run(args: argparse.Namespace) -> int:
    from ..errors import UserError
    from ..models import resolve_model
    from ..planner import plan
    from .common import machine_and_budget, summary_line

    from ..model_info import read_model_info

    info = read_model_info(resolve_model(args.model))
    d = describe(info)
    args.vram = args.ram = None
    try:
        _, budget = machine_and_budget(args)
        here = summary_line(info, plan(info, budget, min(4096, info.n_ctx_train)))
    except UserError as e:
        here = str(e)
    d["this_machine"] = here
    if args.json:
        print(json.dumps(d, indent=1))
        return 0
    from rich.console import Console
    from rich.table import Table

    con = Console()
    G = 2**30
    experts = f"{d['experts']} experts, top-{d['experts_used']} ({d['expert_bytes'] / G:.1f} GiB of experts)" if d["experts"] > 1 else "dense"
    t = Table(show_header=False, box=None)
    t.add_column(style="bold")
    t.add_column(overflow="fold")
    for k, v in (("name", d["name"]), ("file", d["path"]), ("type", d["type"]),
                 ("size", f"{d['bytes'] / G:.2f} GiB, {d['parameters'] / 1e9:.2f} B parameters"),
                 ("layout", f"{d['architecture']}, {d['layers']} layers, hidden {d['embedding']}, {d['heads']} heads ({d['kv_heads']} KV)"),
                 ("experts", experts), ("context", str(d["context"])),
                 ("tokenizer", f"{d['tokenizer']}, {d['vocabulary']} tokens"), ("tools", d["tools"]),
                 ("source", d["source"] or "-"), ("this machine", here)):
        t.add_row(k, v)
    con.print(t)
    types = Table(title="Tensor types", title_justify="left")
    types.add_column("type")
    types.add_column("GiB", justify="right")
    types.add_column("share", justify="right")
    for name, v in d["tensor_types"].items():
        types.add_row(name, f"{v['bytes'] / G:.2f}", f"{v['share']:.1%}")
    con.print(types)
    if d["chat_template"]:
        first = d["chat_template"].strip().splitlines()[0]
        con.print(f"[bold]chat template[/] ({len(d['chat_template'])} characters): {first[:100]}{'…' if len(first) > 100 else ''}")
    return 0
