"""`localmix info MODEL [--json]`: what a GGUF holds: metadata, tensor types and their share of the file,
expert layout, chat template and tool support, its files, how it would run here, and for a mixed-precision
file (quantize --bpw / --for) what it was made for."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict

from ..units import GiB


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="a GGUF file, or a model name in the store (localmix list)")
    p.add_argument("--json", action="store_true", help="as JSON")


def describe(mf, info) -> dict:
    """A ModelFile and its ModelInfo as data."""
    kv = mf.kv
    total = info.weight_bytes or 1
    types: dict[str, int] = {}
    for t in info.tensors:
        types[t.type] = types.get(t.type, 0) + t.nbytes
    template = info.prompt.template or ""
    return {
        "path": info.path, "files": [str(p) for p in mf.parts], "name": info.name, "architecture": info.arch,
        "type": info.file_type, "parameters": info.n_params, "bytes": info.weight_bytes,
        "layers": info.n_layer, "embedding": info.n_embd, "heads": info.n_head, "kv_heads": info.n_head_kv,
        "experts": info.n_expert, "experts_used": info.n_expert_used,
        "expert_bytes": sum(t.nbytes for t in info.tensors if t.role == "expert"),
        "context": info.n_ctx_train, "vocabulary": info.n_vocab, "tokenizer": kv.get("tokenizer.ggml.model"),
        "rope_base": kv.get(f"{info.arch}.rope.freq_base"),
        "tensor_types": {k: {"bytes": v, "share": v / total} for k, v in sorted(types.items(), key=lambda kv_: -kv_[1])},
        "chat_template": template,
        "tools": "native (Mistral [AVAILABLE_TOOLS]/[TOOL_CALLS])" if info.native_tools
                 else "in the chat template" if "tool" in template else "JSON protocol (localmix)",
        "source": kv.get("general.source.huggingface.repository"),
        "quantized_by": kv.get("general.quantized_by"),
        "routing": {"tokens": info.routing_tokens, "expert_counts": [list(r) for r in info.routing]} if info.routing else None,
        "target": asdict(info.target) if info.target else None,
    }


def target_line(target: dict) -> str:
    """What a mixed-precision file was made for, in words."""
    from ..units import fmt_bytes

    def number(key: str, fmt: str) -> str:
        return "?" if target.get(key) is None else format(target[key], fmt)

    if target["kind"] == "bpw":
        made = f"{number('bpw', 'g')} bits per weight (quantize --bpw)"
    else:
        def size(key: str) -> str:
            return "?" if target.get(key) is None else fmt_bytes(target[key])

        bw = "?" if target.get("ram_bandwidth") is None else f"{target['ram_bandwidth'] / 1e9:.1f}"
        asked = f", asked {number('tps', 'g')} tok/s" if target.get("tps") else ""
        gpu = "no GPU" if target.get("vram") == 0 else f"GPU {size('vram')}"
        made = (f"{gpu}, RAM {size('ram')}, RAM read {bw} GB/s, context {number('ctx', 'd')}{asked} "
                f"(quantize --for): predicted {number('predicted_decode_tps', '.1f')} tok/s decode")
    return f"{made}; estimated error {number('predicted_error', '.4g')} (uniform reference {number('reference_error', '.4g')})"


def shares(row) -> list[float]:
    """Each expert's share of a layer's choices."""
    total = sum(row)
    return [c / total if total else 0.0 for c in row]


def skew(row) -> float:
    """The busiest expert's share over an even share (1.0: perfectly balanced routing)."""
    return max(shares(row), default=0.0) * len(row)


BARS = "▁▂▃▄▅▆▇█"


def heat_cell(share: float, n_expert: int) -> str:
    """A share as a background colour from cold (blue, half of even or less) to hot (red, twice even or more)."""
    x = min(max(share * n_expert / 2, 0.25), 1.0)  # even share -> 0.5
    red, blue = int(255 * x), int(255 * (1 - x))
    return f"on rgb({red},64,{blue})"


def routing_table(routing: list[list[int]], tokens: int):
    """Per layer: each expert's share of the choices, coloured by heat (a bar per expert when there are
    too many experts for columns), and the skew."""
    from rich.table import Table

    n_expert = len(routing[0])
    t = Table(title=f"Expert routing while calibrating ({tokens:,} tokens): share of each layer's choices",
              title_justify="left")
    t.add_column("layer", justify="right")
    wide = n_expert <= 16
    if wide:
        for e in range(n_expert):
            t.add_column(f"e{e}", justify="right")
    else:
        t.add_column("experts (bar height: share, relative to the busiest)")
    t.add_column("skew", justify="right")
    for i, row in enumerate(routing):
        s = shares(row)
        if wide:
            cells = [f"[{heat_cell(x, n_expert)}]{x:5.1%}[/]" for x in s]
        else:
            top = max(s) or 1.0
            cells = ["".join(BARS[min(len(BARS) - 1, int(x / top * len(BARS)))] for x in s)]
        t.add_row(str(i), *cells, f"{skew(row):.2f}x")
    return t


def run(args: argparse.Namespace) -> int:
    from ..loader import summary_here
    from ..model_info import model_info
    from ..modelfile import open_model_file
    from .common import open_model

    mf = open_model_file(open_model(args.model))
    info = model_info(mf)
    d = describe(mf, info)
    d["this_machine"] = summary_here(info)
    target = info.target
    if target is not None and target.kind == "machine" and None not in (target.vram, target.ram):
        d["target_machine"] = summary_here(info, target.vram, target.ram, target.ram_bandwidth)  # planned anew, at 4096
    if args.json:
        print(json.dumps(d, indent=1))
        return 0
    from rich.console import Console
    from rich.table import Table

    from ..text import markup

    con = Console()
    experts = (f"{d['experts']} experts, top-{d['experts_used']} ({d['expert_bytes'] / GiB:.1f} GiB of experts)"
               if d["experts"] > 1 else "dense")
    files = d["path"] if len(d["files"]) == 1 else f"{d['path']} (and {len(d['files']) - 1} more parts)"
    t = Table(show_header=False, box=None)
    t.add_column(style="bold")
    t.add_column(overflow="fold")
    kind = d["type"] + (" (mixed precision: the uniform mix nearest in size)" if d["target"] else "")
    for k, v in (("name", d["name"]), ("file", files), ("type", kind),
                 ("size", f"{d['bytes'] / GiB:.2f} GiB, {d['parameters'] / 1e9:.2f} B parameters"),
                 ("layout", f"{d['architecture']}, {d['layers']} layers, hidden {d['embedding']}, {d['heads']} heads ({d['kv_heads']} KV)"),
                 ("experts", experts), ("context", str(d["context"])),
                 ("tokenizer", f"{d['tokenizer']}, {d['vocabulary']} tokens"), ("tools", d["tools"]),
                 ("source", d["source"] or "-"), ("this machine", d["this_machine"])):
        t.add_row(k, markup(v, 1000))  # names, paths and metadata come from the file: shown, never markup
    if d["target"]:
        t.add_row("made for", markup(target_line(d["target"]), 1000))
    if d.get("target_machine"):
        t.add_row("on that machine", markup(d["target_machine"], 1000))
    con.print(t)
    types = Table(title="Tensor types", title_justify="left")
    types.add_column("type")
    types.add_column("GiB", justify="right")
    types.add_column("share", justify="right")
    for name, v in d["tensor_types"].items():
        types.add_row(name, f"{v['bytes'] / GiB:.2f}", f"{v['share']:.1%}")
    con.print(types)
    if d["routing"]:
        con.print(routing_table(d["routing"]["expert_counts"], d["routing"]["tokens"]))
    if d["chat_template"]:
        first = d["chat_template"].strip().splitlines()[0] if d["chat_template"].strip() else ""
        con.print(f"[bold]chat template[/] ({len(d['chat_template']):,} characters): {markup(first, 100)}")
    return 0
