"""A real `localmix serve` app under uvicorn on 127.0.0.1, in a thread of the test process."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

START_TIMEOUT = 30  # seconds for uvicorn to start listening
STOP_TIMEOUT = 60  # seconds for a cancelled generation and uvicorn to end


def loaded(path: str | Path, *, ctx: int | None = None, threads: int | None = 2):
    """A Model of the GGUF at `path`, read, planned for the CPU and loaded."""
    from localmix.loader import prepare
    from localmix.server.app import load_model, model_for

    p = prepare(path, vram=0, ctx=ctx)
    model = model_for(p)
    load_model(model, p, threads=threads)
    return model


@contextlib.contextmanager
def serving(model, *, ctx: int | None = None, threads: int | None = 2, **config) -> Iterator[str]:
    """The app serving `model` (a server.app.Model, or a GGUF path loaded here and closed after) on
    127.0.0.1 at a free port; yields the base URL ('http://127.0.0.1:PORT'). ServerConfig fields as
    keywords (api_key=..., max_queue=...). `serving.app` is the app last started (its state.service)."""
    import uvicorn

    from localmix.server.app import Model, ServerConfig, make_app

    own = not isinstance(model, Model)
    if own:
        model = loaded(model, ctx=ctx, threads=threads)
    app = make_app(model, ServerConfig(**config))
    serving.app = app
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="test-uvicorn", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        yield f"http://127.0.0.1:{port}"
    finally:
        service = app.state.service
        service.stop()
        server.should_exit = True
        thread.join(STOP_TIMEOUT)
        sock.close()
        idle = service.idle.wait(STOP_TIMEOUT)
        if own and idle and model.backend is not None:  # never free the model under a running generation
            model.backend.close()
