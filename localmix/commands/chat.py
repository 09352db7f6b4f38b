"""`localmix chat [MODEL] [--vram] [--ctx] [--system]`: the terminal chat app. With no MODEL it opens the
only model in the store, lets you pick when there are several, and builds the demo model when there
are none."""

from __future__ import annotations

import argparse

from .common import add_budget_arguments


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", nargs="?",
                   help="a GGUF file or a store name (default: the store's model, a picker if several, else the demo)")
    add_budget_arguments(p)
    p.add_argument("--system", help="system prompt for a new chat")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: physical cores)")
    p.add_argument("--tools", nargs="*", metavar="FILE",
                   help="let the model call tools: the built-in ones, installed ones, and those in FILE(s)")


def store_models() -> list:
    """The store's models (their first files), most recently changed first; the demo is not one."""
    from ..demo import DEMO_FILE
    from ..models import stored_models

    paths = [m.path for m in stored_models() if m.path.name != DEMO_FILE]
    return sorted(paths, key=lambda p: -p.stat().st_mtime)


def make_prepare(args: argparse.Namespace, default_model):
    """The app's loader: (progress, path) -> (backend, {"split", "summary"}), run in the app's loading thread.
    No path and no default model: the demo, built on first use."""

    def prepare(progress, path=None):
        from pathlib import Path

        from ..backends.llama import LlamaBackend
        from ..demo import ensure_demo
        from ..model_info import read_model_info
        from ..planner import plan
        from .common import machine_and_budget, split_label, summary_line

        path = path or default_model or ensure_demo(lambda f: progress(f, "Building the demo model (first run only)"))
        info = read_model_info(path)
        hw, budget = machine_and_budget(args)
        p = plan(info, budget, args.ctx, args.kv_type)
        backend = LlamaBackend(info, p, ctx=args.ctx, kv_type=args.kv_type, threads=args.threads or hw.cores)
        backend.load(lambda f: progress(f, f"Loading {Path(path).name}"))
        return backend, {"split": split_label(p), "summary": summary_line(info, p)}

    return prepare


def run(args: argparse.Namespace) -> int:

    from ..app.chat import ChatApp
    from ..demo import DEMO_FILE
    from ..paths import home
    from ..store import Store, default_path

    from ..models import resolve_model

    models = [resolve_model(args.model)] if args.model else store_models()
    demo = not models
    prepare = make_prepare(args, models[0] if models else None)
    label = DEMO_FILE.removesuffix(".gguf") if demo else models[0].name.removesuffix(".gguf")
    choices = [(m.name, str(m)) for m in models] if len(models) > 1 else None
    toolset = None
    if args.tools is not None:
        from ..tools import load_tools

        toolset = load_tools(args.tools)
    store = Store(default_path())
    app = ChatApp(prepare, store, label, ctx=args.ctx, system=args.system, demo=demo, exports=home() / "exports",
                  choices=choices, toolset=toolset)
    try:
        app.run()
    finally:
        if app.backend is not None:
            app.backend.close()
        store.close()
    return 0
