"""`localmix chat [MODEL] [--vram] [--ctx] [--system]`: the terminal chat app. With no MODEL it opens the
only model in the store, lets you pick when there are several, and builds the demo model when there
are none. This module puts the app together: the store of chats, and a `prepare` that reads, plans and
loads the model (in the app's loading thread) and describes the plan in words.

`localmix chat --server URL [--model NAME] [--api-key KEY]` chats with a model served elsewhere (a
`localmix serve`, Ollama, llama-server) through the OpenAI API: `prepare` connects instead of loading,
and the app, which only sees a backend and its placement, is the same."""

from __future__ import annotations

import argparse

from .common import add_budget_arguments


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", nargs="?",
                   help="a GGUF file or a store name (default: the store's model, a picker if several, else the demo)")
    add_budget_arguments(p)
    p.add_argument("--system", help="system prompt for a new chat")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: the cores other programs leave free, checked at each reply)")
    p.add_argument("--tools", nargs="*", metavar="FILE",
                   help="let the model call tools: the built-in ones, installed ones, and those in FILE(s)")
    p.add_argument("--server", metavar="URL",
                   help="chat with a model served over the OpenAI API (localmix serve, Ollama, llama-server), "
                        "e.g. http://127.0.0.1:8080; MODEL and the budget flags are then the server's business")
    p.add_argument("--model", dest="server_model", metavar="NAME",
                   help="with --server: the server's model to chat with (default: the first it lists)")
    p.add_argument("--api-key", metavar="KEY",
                   help="with --server: its API key (default: $LOCALMIX_API_KEY, then $OPENAI_API_KEY)")


# Flags that only mean something for a model loaded here: (flag, dest, default). With --server they are refused.
LOCAL_ONLY = (("--vram", "vram", None), ("--ram", "ram", None), ("--ctx", "ctx", None), ("--ubatch", "ubatch", None),
              ("--kv-type", "kv_type", "f16"),
              ("--ram-bandwidth", "ram_bandwidth", None), ("--measure", "measure", False), ("--threads", "threads", None))


def store_models() -> list:
    """The store's complete models (their first files), most recently changed first; the demo is not one."""
    from ..demo import DEMO_FILE
    from ..models import stored_models

    paths = [m.path for m in stored_models() if m.model is not None and m.path.name != DEMO_FILE]
    return sorted(paths, key=lambda p: -p.stat().st_mtime)


def make_prepare(*, vram: int | None = None, ram: int | None = None, ctx: int | None = None, kv_type: str = "f16",
                 threads: int | None = None, default_model=None, ram_bandwidth: float | None = None, rpc: dict | None = None,
                 ubatch: int | None = None):
    """The app's loader: (progress, path) -> (backend, {"split", "summary"}), run in the app's loading
    thread. No path and no default model: the demo, built on first use. `ctx` None: planner.default_context
    (the longest context that keeps predicted decode within 10% of its best)."""

    def prepare(progress, path=None):
        from pathlib import Path

        from ..demo import ensure_demo
        from ..describe import split_label, summary_line
        from ..loader import load
        from ..loader import prepare as read_and_plan

        path = path or default_model or ensure_demo(lambda f: progress(f, "Building the demo model (first run only)"))
        p = read_and_plan(path, vram=vram, ram=ram, ctx=ctx, kv_type=kv_type, ram_bandwidth=ram_bandwidth, ubatch=ubatch,
                          auto_context=True, **(rpc or {}))
        backend = load(p, threads=threads, progress=lambda f: progress(f, f"Loading {Path(path).name}"))
        chosen = [] if ctx else [f"context {p.ctx} tokens: the longest within 10% of the best predicted decode (--ctx to choose)"]
        summary = " · ".join([summary_line(p.info, p.plan), *chosen, *p.notes])  # e.g. the context lowered to the trained one
        return backend, {"split": split_label(p.plan), "summary": summary}

    return prepare


def make_server_prepare(url: str, model: str | None = None, api_key: str | None = None):
    """The app's loader for --server: (progress, path) -> (OpenAIBackend, {"split", "summary", "model"}).
    The status bar says where the model runs (the server, and its CPU/GPU split when it is a localmix one);
    the load notice gives its plan summary."""

    def prepare(progress, path=None):
        from ..backends.openai import OpenAIBackend

        backend = OpenAIBackend(url, model=model, api_key=api_key)
        progress(0.0, f"Connecting to {backend.where}")
        backend.load(lambda f: progress(f, f"The server at {backend.where} is loading its model"))
        return backend, server_placement(backend)

    return prepare


def server_placement(backend) -> dict:
    from ..text import shown

    d = backend.details
    split = " · ".join([f"server {backend.where}", *([shown(d["split"], 60)] if isinstance(d.get("split"), str) else [])])
    summary = d["plan"] if isinstance(d.get("plan"), str) else f"{backend.model} at {backend.url}"
    return {"split": split, "summary": shown(summary, 500), "model": backend.model}


def api_key(args: argparse.Namespace) -> str | None:
    import os

    return args.api_key or os.environ.get("LOCALMIX_API_KEY") or os.environ.get("OPENAI_API_KEY") or None


def need_terminal() -> None:
    """The app draws on a terminal and reads keys from it: without one it would wait forever."""
    import sys

    from ..errors import LocalmixError

    if not all(stream is not None and stream.isatty() for stream in (sys.stdin, sys.stdout)):
        raise LocalmixError("chat needs a terminal (its input or output is not one); for one answer without a "
                            "terminal: localmix run MODEL PROMPT")


def run(args: argparse.Namespace) -> int:
    from ..errors import LocalmixError
    from ..text import shown

    if args.server is not None and args.model:
        raise LocalmixError(f"chat: MODEL ({shown(args.model)}) and --server exclude each other: the server has its models; "
                            "choose one with --model NAME")
    if args.server is not None and (given := [flag for flag, dest, default in LOCAL_ONLY if getattr(args, dest) != default]):
        raise LocalmixError(f"chat --server: {', '.join(given)} plan a model loaded here; the server has its own plan "
                            "(give them to localmix serve)")
    if args.server is None and (args.server_model or args.api_key):
        raise LocalmixError("chat: --model and --api-key go with --server URL (a local model is the MODEL argument)")
    if args.server is not None:
        from ..backends.openai import split_url

        split_url(args.server)  # a malformed URL is an error line before the app starts
    need_terminal()
    from ..app.chat import ChatApp
    from ..demo import DEMO_FILE
    from ..modelfile import model_name
    from ..paths import home
    from ..store import Store, default_path
    from .common import open_model, rpc_options

    if args.server is not None:
        models, demo, choices = [], False, None
        prepare = make_server_prepare(args.server, args.server_model, api_key(args))
        label = args.server_model or "server model"  # the server's name for it once connected
    else:
        models = [open_model(args.model)] if args.model else store_models()
        if args.measure:
            from ..hardware import detect

            detect(measure=True)
        demo = not models
        prepare = make_prepare(vram=args.vram, ram=args.ram, ctx=args.ctx, kv_type=args.kv_type, threads=args.threads,
                               default_model=models[0] if models else None, ram_bandwidth=args.ram_bandwidth,
                               rpc=rpc_options(args), ubatch=args.ubatch)
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
