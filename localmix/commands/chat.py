"""`localmix chat [MODEL] [--vram] [--ctx] [--system]`: the terminal chat app. With no MODEL it opens the
only model in the store, lets you pick when there are several, and builds the demo model when there
are none. This module puts the app together: the store of chats, and a `prepare` that reads, plans and
loads the model (in the app's loading thread) and describes the plan in words."""

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
    """The store's complete models (their first files), most recently changed first; the demo is not one."""
    from ..demo import DEMO_FILE
    from ..models import stored_models

    paths = [m.path for m in stored_models() if m.model is not None and m.path.name != DEMO_FILE]
    return sorted(paths, key=lambda p: -p.stat().st_mtime)


def make_prepare(*, vram: int | None = None, ram: int | None = None, ctx: int | None = None, kv_type: str = "f16",
                 threads: int | None = None, default_model=None, ram_bandwidth: float | None = None):
    """The app's loader: (progress, path) -> (backend, {"split", "summary"}), run in the app's loading
    thread. No path and no default model: the demo, built on first use."""

    def prepare(progress, path=None):
        from pathlib import Path

        from ..demo import ensure_demo
        from ..describe import split_label, summary_line
        from ..loader import load
        from ..loader import prepare as read_and_plan

        path = path or default_model or ensure_demo(lambda f: progress(f, "Building the demo model (first run only)"))
        p = read_and_plan(path, vram=vram, ram=ram, ctx=ctx, kv_type=kv_type, ram_bandwidth=ram_bandwidth)
        backend = load(p, threads=threads, progress=lambda f: progress(f, f"Loading {Path(path).name}"))
        summary = " · ".join([summary_line(p.info, p.plan), *p.notes])  # e.g. the context lowered to the trained one
        return backend, {"split": split_label(p.plan), "summary": summary}

    return prepare


def need_terminal() -> None:
    """The app draws on a terminal and reads keys from it: without one it would wait forever."""
    import sys

    from ..errors import LocalmixError

    if not all(stream is not None and stream.isatty() for stream in (sys.stdin, sys.stdout)):
        raise LocalmixError("chat needs a terminal (its input or output is not one); for one answer without a "
                            "terminal: localmix run MODEL PROMPT")


def run(args: argparse.Namespace) -> int:
    need_terminal()
    from ..app.chat import ChatApp
    from ..demo import DEMO_FILE
    from ..modelfile import model_name
    from ..paths import home
    from ..store import Store, default_path
    from .common import open_model

    models = [open_model(args.model)] if args.model else store_models()
    if args.measure:
        from ..hardware import detect

        detect(measure=True)
    demo = not models
    prepare = make_prepare(vram=args.vram, ram=args.ram, ctx=args.ctx, kv_type=args.kv_type, threads=args.threads,
                           default_model=models[0] if models else None, ram_bandwidth=args.ram_bandwidth)
    label = DEMO_FILE.removesuffix(".gguf") if demo else model_name(models[0])
    choices = [(model_name(m), str(m)) for m in models] if len(models) > 1 else None
    toolset = None
    if args.tools is not None:
        from ..tools import load_tools

        toolset = load_tools(args.tools)
    store = Store(default_path())
    app = ChatApp(prepare, store, label, system=args.system, demo=demo, exports=home() / "exports",
                  choices=choices, toolset=toolset)
    try:
        app.run()
    finally:
        if app.stop_generating() and app.backend is not None:  # never free the model under a running reply
            app.backend.close()
        store.close()
    return app.return_code or 0
