"""`localmix serve [MODEL] [--host] [--port] [--api-key]`: the planned model behind OpenAI's chat-completions
API (localmix/server). Reads and plans first (an error is one line before anything listens), listens on the
socket it binds itself, loads the model in a thread while /health says "loading" (progress on stderr), then
prints one line on stdout: the model, the URL and the plan. Loopback only unless there is an API key;
Ctrl-C cancels the running generation, waits for it, frees the model and exits 0."""

from __future__ import annotations

import argparse
import contextlib
import errno
import ipaddress
import os
import signal
import socket
import sys
import threading

from .common import add_budget_arguments, add_threads_argument, bounded

STOP_WAIT = 30  # seconds for connections (a client that stopped reading) and a cancelled generation to end at Ctrl-C
EXTRA = "pip install 'localmix[serve]' (or: pipx inject localmix starlette uvicorn)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", nargs="?",
                   help="a GGUF file or a store name (default: the store's only model, else the demo)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1; any other than loopback needs --api-key)")
    p.add_argument("--port", type=bounded(int, 0, 65535, "a port"), default=8080, help="(default 8080; 0: any free port)")
    p.add_argument("--api-key", metavar="KEY",
                   help="clients must send 'Authorization: Bearer KEY' (default: $LOCALMIX_API_KEY, else no key)")
    p.add_argument("--cors", nargs="+", metavar="ORIGIN", help="let web pages from ORIGIN(s) call the API (default: none)")
    p.add_argument("--queue", type=bounded(int, 0, 10_000, "a request count"), default=8,
                   help="requests that may wait while one generates; more get 503 (default 8)")
    p.add_argument("--tools", nargs="*", metavar="FILE",
                   help="tools the server runs itself (side-effect free only): the built-in ones, installed ones, FILE(s)")
    p.add_argument("--log-requests", action="store_true", help="log each request on stderr")
    add_budget_arguments(p)
    add_threads_argument(p)


def run(args: argparse.Namespace) -> int:
    _need_extra()
    from ..errors import LocalmixError
    from .common import planned

    key = args.api_key or os.environ.get("LOCALMIX_API_KEY") or None
    local = is_loopback(args.host)
    if not local and not key:  # before anything is read or built
        raise LocalmixError(f"--host {args.host} can be reached from other machines: give an --api-key "
                            "(or set LOCALMIX_API_KEY), or serve on 127.0.0.1")
    toolset = _server_tools(args.tools)
    args.model = str(_model_path(args))
    p = planned(args)
    sock = listen(args.host, args.port)
    with contextlib.closing(sock):
        failed = _serve(args, p, sock, key, local, toolset)
    if failed:
        raise failed[0]
    return 0


def _serve(args, p, sock, key: str | None, local: bool, toolset) -> list[BaseException]:
    """Serve on `sock` until a signal (or a failed load) stops it; the load's failure, if any."""
    import uvicorn

    from ..server.app import LOOPBACK_HOSTS, ServerConfig, make_app, model_for

    host = _url_host(args.host)
    url = f"http://{host}:{sock.getsockname()[1]}/v1"
    model = model_for(p)
    config = ServerConfig(api_key=key, cors=tuple(args.cors or ()), max_queue=args.queue, server_tools=toolset,
                          # without a key, a loopback server answers only requests addressed to it (DNS rebinding)
                          allowed_hosts=None if key or not local else tuple({*LOOPBACK_HOSTS, host.lower()}))
    app = make_app(model, config)
    service = app.state.service
    server = _server(uvicorn.Config(app, log_level="warning", access_log=args.log_requests, lifespan="off",
                                    server_header=False, timeout_graceful_shutdown=STOP_WAIT), service)
    if args.log_requests:  # on stderr (uvicorn logs them on stdout, which has the one ready line)
        import logging

        access = logging.getLogger("uvicorn.access")
        access.setLevel(logging.INFO)
        for handler in access.handlers:
            if isinstance(handler, logging.StreamHandler):
                handler.setStream(sys.stderr)
    failed: list[BaseException] = []
    loader = threading.Thread(target=_load, args=(model, p, args.threads, server, failed, url), name="localmix-load", daemon=True)
    loader.start()
    try:
        server.run(sockets=[sock])
    finally:
        service.stop()
        loader.join()  # llama.cpp's load cannot be interrupted: the model is freed once it is in
        if service.idle.wait(STOP_WAIT) and model.backend is not None:  # never free the model under a generation
            model.backend.close()
    return failed


def _need_extra() -> None:
    from ..errors import LocalmixError

    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise LocalmixError(f"serve needs {e.name}, which is not installed: {EXTRA}") from None


def _model_path(args):
    """MODEL, else the store's only model, else the demo (built on first use)."""
    from ..errors import LocalmixError
    from ..modelfile import model_name
    from ..text import shown
    from .chat import store_models
    from .common import open_model

    if args.model:
        return open_model(args.model)
    models = store_models()
    if len(models) > 1:
        names = ", ".join(shown(model_name(m)) for m in models[:10])
        raise LocalmixError(f"the store has {len(models)} models ({names}{', ...' if len(models) > 10 else ''}): "
                            "name the one to serve")
    if models:
        return models[0]
    from ..demo import ensure_demo

    with _progress("Building the demo model (first run only)", eager=False) as update:
        return ensure_demo(update)


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a name: it may resolve anywhere
        return False


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, or one line saying why not (a port in use, an unknown host)."""
    from ..errors import LocalmixError

    try:
        family, kind, proto, _, address = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as e:
        raise LocalmixError(f"--host {host}: {e.strerror}") from None
    sock = socket.socket(family, kind, proto)
    try:
        if os.name != "nt":  # a restart may reuse the port at once; on Windows this would let two servers share it
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as e:
        sock.close()
        hint = ": another program is listening there (choose another --port)" if e.errno == errno.EADDRINUSE else ""
        raise LocalmixError(f"cannot listen on {host}:{port}: {e.strerror or e}{hint}") from None
    return sock


def _server_tools(files):
    """--tools: the tools the server runs itself; one with side effects is refused (clients run those)."""
    if files is None:
        return None
    from ..errors import LocalmixError
    from ..text import shown
    from ..tools import load_tools

    toolset = load_tools(files)
    risky = [name for name, t in toolset.tools.items() if t.side_effects]
    if risky:
        raise LocalmixError(f"--tools: {', '.join(shown(n) for n in risky)} ha{'ve' if len(risky) > 1 else 's'} side effects; "
                            "the server runs only tools without (clients run their own tools)")
    return toolset


@contextlib.contextmanager
def _progress(description: str, *, eager: bool = True):
    """A progress bar on stderr (a line when it is not a terminal); yields update(fraction)."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

    from ..text import markup

    console = Console(stderr=True)
    if not console.is_terminal:  # one line; not eager: once there is progress (a demo already built reports none)
        said = [] if not eager else [print(f"localmix serve: {description}", file=sys.stderr, flush=True)]

        def say(fraction: float) -> None:
            if not said:
                said.append(print(f"localmix serve: {description}", file=sys.stderr, flush=True))

        yield say
        return
    bar = Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), TimeElapsedColumn(),
                   console=console, transient=True)
    task = bar.add_task(markup(description), total=1.0)
    with bar:
        yield lambda fraction: bar.update(task, completed=fraction)


def _load(model, p, threads, server, failed: list, url: str) -> None:
    """The load thread: the model into `model`, then the one line on stdout; a failure stops the server."""
    from ..server.app import load_model
    from ..text import shown

    try:
        with _progress(f"Loading {shown(model.name)}") as update:
            load_model(model, p, threads=threads, progress=update)
    except BaseException as e:  # noqa: BLE001 - raised again by run(), after the server has stopped
        failed.append(e)
        server.should_exit = True
        return
    if not server.should_exit:
        with contextlib.suppress(OSError, ValueError):  # stdout closed: the server serves all the same
            print(f"serving {shown(model.name)} at {url} · {model.details['plan']}", flush=True)


def _server(config, service):
    """uvicorn's server, stopping the generation when a signal stops it. A signal that stopped it is its
    normal end: uvicorn would raise it again after shutting down; here Ctrl-C exits 0."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            service.stop()
            super().handle_exit(sig, frame)

        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    return Server(config)
