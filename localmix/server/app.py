"""The HTTP side of `localmix serve` (Starlette): routes, the API key and Host checks, the body limit, and
one generation at a time. A request waits its turn in a bounded queue (full: 503); its answer runs in a
thread (engine.answer blocks) that feeds an asyncio queue; a client that goes away cancels it, and the
next request starts once that thread has ended. Every error is OpenAI's JSON error object."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from quantize.errors import Error

from ..backends import Backend
from ..errors import ContextFull, TemplateError, ToolCallError, WorkerError
from ..tools import ToolSet
from .api import ApiError, ChatRequest, chunk, closing_chunks, completion, model_object, new_id, parse_chat_request, usage_chunk
from .engine import Delta, Finish, answer

log = logging.getLogger("localmix.server")

RETRY_AFTER = 2  # seconds, for 503s: a turn of the queue or the rest of a load takes about that or more
CANCEL_POLL = 0.05  # seconds between cancels of a generation that should stop (see Generation.events)
# Pieces that come faster than this are sent together: each chunk wakes the event loop, and on a machine
# whose cores all decode, that work is taken from llama.cpp (one chunk a token cost a small model ~8% of
# its decode speed on 2 cores). A model slower than 40 tok/s still sends every token on its own.
SEND_EVERY = 0.025  # seconds
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")


@dataclass
class ServerConfig:
    api_key: str | None = None
    cors: tuple[str, ...] = ()
    max_body: int = 8 * 2**20
    max_queue: int = 8  # requests waiting beyond the one generating; more -> 503 + Retry-After
    allowed_hosts: tuple[str, ...] | None = None  # Host header check against DNS rebinding on loopback
    server_tools: ToolSet | None = None


@dataclass
class Model:
    """What is served; commands/serve.py (or a test) loads it and sets `backend` and `state`."""

    name: str
    aliases: set[str] = field(default_factory=set)  # names a request's "model" may use
    details: dict = field(default_factory=dict)  # {"plan", "split", "ctx"}: /v1/models' "localmix" field
    state: str = "loading"  # "loading" | "ready" | "failed"
    progress: float = 0.0
    backend: Backend | None = None
    error: str = ""  # why it failed to load
    path: Path | None = None  # the file, to leave out of the store's list
    created: int = field(default_factory=lambda: int(time.time()))


def model_for(p) -> Model:
    """The Model for a loader.Planned, still loading."""
    from ..describe import split_label, summary_line
    from ..modelfile import model_name

    path = Path(p.model.path)
    name = model_name(path)
    summary = " · ".join([summary_line(p.info, p.plan), *p.notes])
    return Model(name, aliases={name, path.name, str(path)}, details={"plan": summary, "split": split_label(p.plan), "ctx": p.ctx},
                 path=path, created=int(path.stat().st_mtime))


def load_model(model: Model, p, *, threads: int | None = None, progress=None) -> None:
    """Load `p` into `model`: ready with its backend, or failed with the reason (the error is raised too)."""
    from ..loader import load

    def on_progress(fraction: float) -> None:
        model.progress = fraction
        if progress is not None:
            progress(fraction)

    try:
        backend = load(p, threads=threads, progress=on_progress)
    except Error as e:
        model.state, model.error = "failed", str(e)
        raise
    model.backend, model.progress, model.state = backend, 1.0, "ready"


# -- errors ---------------------------------------------------------------------------------------------

# Expected failures of a generation that are not ApiErrors already: (class, status, type, code)
FAILURES = (
    (ContextFull, 400, "invalid_request_error", "context_length_exceeded"),
    (TemplateError, 400, "invalid_request_error", "template_error"),
    (ToolCallError, 500, "server_error", "tool_call_error"),
    # a worker (--rpc) stopped answering: the upstream failed, this request with it; the next one starts the
    # model's process again (backends/isolated.py), so the server goes on
    (WorkerError, 502, "server_error", "worker_error"),
    (Error, 500, "server_error", None),
)


def api_error(e: BaseException) -> ApiError:
    """Any failure as the ApiError a client gets; an unexpected one is logged here, not shown to it."""
    if isinstance(e, ApiError):
        return e
    for cls, status, kind, code in FAILURES:
        if isinstance(e, cls):
            return ApiError(status, str(e), type=kind, code=code)
    log.error("unexpected error", exc_info=e)
    return ApiError(500, "internal error (see the server's log)", type="server_error")


def error_response(e: ApiError, headers: dict | None = None) -> JSONResponse:
    if e.status == 503:
        headers = {"Retry-After": str(RETRY_AFTER), **(headers or {})}
    return JSONResponse(e.body(), e.status, headers=headers)


def sse(obj: object) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


# -- one generation -------------------------------------------------------------------------------------

_END, _WAKE = object(), object()


class Generation:
    """engine.answer running in its own thread; its events reach the event loop through a queue."""

    def __init__(self, backend: Backend, req: ChatRequest, server_tools: ToolSet | None):
        self.backend, self.req, self.server_tools = backend, req, server_tools
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.ended = threading.Event()  # the thread is done with the backend
        self.cancelled = False
        self.thread = threading.Thread(target=self._work, name="localmix-generation", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def cancel(self) -> None:
        """From any thread: stop within a token."""
        self.cancelled = True
        self.backend.cancel()
        self._put(_WAKE)  # the reader repeats the cancel from now on (see events)

    def _work(self) -> None:
        pending, last = "", 0.0  # text not sent yet; when a piece was last sent
        try:
            for event in answer(self.backend, self.req, server_tools=self.server_tools):
                if isinstance(event, Delta):
                    pending += event.text
                    if time.monotonic() - last < SEND_EVERY:
                        continue
                    event, last = Delta(pending), time.monotonic()
                    pending = ""
                elif pending:
                    self._put(Delta(pending))
                    pending = ""
                self._put(event)
        except BaseException as e:  # noqa: BLE001 - handed to the request, which answers with it
            if pending:
                self._put(Delta(pending))
            self._put(e)
        finally:
            self.ended.set()
            self._put(_END)

    def _put(self, item) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody listens any more
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)

    async def events(self) -> AsyncIterator[Delta | Finish]:
        """The answer's events until the thread has ended; a failure in it is raised here."""
        while True:
            if not self.cancelled:
                item = await self.queue.get()
            else:
                try:
                    item = await asyncio.wait_for(self.queue.get(), CANCEL_POLL)
                except asyncio.TimeoutError:
                    self.backend.cancel()  # again: a cancel that came before a generate() started was cleared by it
                    continue
            if item is _END:
                return
            if item is _WAKE:
                continue
            if isinstance(item, BaseException):
                raise item
            yield item

    async def wait(self) -> None:
        """Until the thread has ended (whatever the events' reader did)."""
        async for _ in self.events():
            pass


# -- the service ----------------------------------------------------------------------------------------


class Service:
    """The state behind the routes: the model, the queue, the generation running."""

    def __init__(self, model: Model, config: ServerConfig):
        self.model, self.config = model, config
        self._lock: asyncio.Lock | None = None  # made in the server's loop
        self.waiting = 0
        self.closing = False
        self.current: Generation | None = None
        self.idle = threading.Event()  # no generation thread is running
        self.idle.set()

    @property
    def lock(self) -> asyncio.Lock:
        if self._lock is None:
            self._lock = asyncio.Lock()
        return self._lock

    def stop(self) -> None:
        """From any thread (a signal handler too): no new generations; the running one is cancelled.
        `idle` says when its thread has ended."""
        self.closing = True
        if (gen := self.current) is not None:
            gen.cancel()

    async def check_model(self, name: str) -> None:
        if name in self.model.aliases:
            return
        if await run_in_threadpool(self._in_store, name):  # opens the store's files: not in the event loop
            raise ApiError(404, f"model '{name}' is in the store but not loaded: this server serves '{self.model.name}'",
                           param="model", code="model_not_found")
        raise ApiError(404, f"the model '{name}' does not exist: this server serves '{self.model.name}'",
                       param="model", code="model_not_found")

    def _in_store(self, name: str) -> bool:
        from ..models import find

        try:
            return find(name) is not None
        except Error:  # several match, or no store: not one model
            return False

    def check_ready(self) -> None:
        state = self.model.state
        if state == "loading":
            raise ApiError(503, f"the model is loading ({self.model.progress:.0%})", type="server_error", code="model_loading")
        if state != "ready":
            raise ApiError(503, f"the model failed to load: {self.model.error}", type="server_error", code="model_failed")

    @contextlib.asynccontextmanager
    async def turn(self, gone: asyncio.Event):
        """Wait for this request's turn (503 when too many wait); yields False if the client went away first."""
        if self.closing:
            raise ApiError(503, "the server is shutting down", type="server_error")
        lock = self.lock
        if lock.locked() and self.waiting >= self.config.max_queue:
            raise ApiError(503, f"the server is busy ({self.waiting} requests waiting); try again later",
                           type="server_error", code="queue_full")
        self.waiting += 1
        try:
            acquired = await _first(lock, gone)
        finally:
            self.waiting -= 1
        if not acquired:
            yield False
            return
        try:
            if self.closing:
                raise ApiError(503, "the server is shutting down", type="server_error")
            yield True
        finally:
            lock.release()

    @contextlib.asynccontextmanager
    async def generation(self, req: ChatRequest):
        """A Generation of `req`, started; the turn ends only when its thread has."""
        gen = Generation(self.model.backend, req, self.config.server_tools)
        self.current = gen
        self.idle.clear()
        gen.start()
        if self.closing:  # stop() came between this request's turn and now
            gen.cancel()
        try:
            yield gen
        finally:
            try:
                if not gen.ended.is_set():
                    gen.cancel()
                    await gen.wait()
            finally:
                self.current = None
                self.idle.set()


async def _first(lock: asyncio.Lock, gone: asyncio.Event) -> bool:
    """Acquire `lock` unless `gone` is set first (then False, and the lock is not left acquired, even
    when the caller is cancelled meanwhile)."""
    a, g = asyncio.ensure_future(lock.acquire()), asyncio.ensure_future(gone.wait())
    try:
        await asyncio.wait({a, g}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        g.cancel()
        if not a.done():
            a.cancel()
            a.add_done_callback(lambda f: f.cancelled() or f.exception() or lock.release())  # got it all the same
    return a.done() and not a.cancelled()


# -- routes ---------------------------------------------------------------------------------------------


async def read_json(request: Request, limit: int) -> object:
    """The body as JSON: 413 past `limit` bytes (announced or sent), 400 when it is not JSON."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise ApiError(413, f"the request body is larger than {limit} bytes", code="request_too_large")
    chunks, size = [], 0
    async for piece in request.stream():
        size += len(piece)
        if size > limit:
            raise ApiError(413, f"the request body is larger than {limit} bytes", code="request_too_large")
        chunks.append(piece)
    try:
        return json.loads(b"".join(chunks))
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise ApiError(400, f"the request body is not JSON: {e}", code="invalid_json") from None


async def _watch(receive, gone: asyncio.Event, on_gone) -> None:
    """Wait for the client to go away (the body has been read: the next message is the disconnect)."""
    while (await receive())["type"] != "http.disconnect":
        pass
    gone.set()
    on_gone()


class ChatCompletions:
    """POST /v1/chat/completions, as a plain ASGI app: it watches the connection itself, so that a client
    that goes away cancels its generation during the prefill too."""

    def __init__(self, service: Service):
        self.service = service

    async def __call__(self, scope, receive, send) -> None:
        request = Request(scope, receive)
        try:
            req = parse_chat_request(await read_json(request, self.service.config.max_body))
            await self.service.check_model(req.model)
            self.service.check_ready()
            await self.answer(req, scope, receive, send)
        except ApiError as e:
            await error_response(e)(scope, receive, send)
        except ClientDisconnect:
            pass

    async def answer(self, req: ChatRequest, scope, receive, send) -> None:
        svc = self.service
        gone = asyncio.Event()
        holder: dict = {}
        watcher = asyncio.create_task(_watch(receive, gone, lambda: (g := holder.get("gen")) and g.cancel()))
        try:
            async with svc.turn(gone) as mine:
                if not mine:
                    return
                async with svc.generation(req) as gen:
                    holder["gen"] = gen
                    if gone.is_set():
                        gen.cancel()
                    meta = (new_id(), int(time.time()), svc.model.name)
                    if req.stream:
                        await self.stream(req, gen, meta, send, watcher)
                    else:
                        await self.whole(gen, meta, scope, send, watcher, gone)
        finally:
            watcher.cancel()

    async def whole(self, gen: Generation, meta, scope, send, watcher, gone) -> None:
        finish = None
        try:
            async for event in gen.events():
                if isinstance(event, Finish):
                    finish = event
        except Exception as e:  # noqa: BLE001 - every failure becomes the client's JSON error
            raise api_error(e) from None
        watcher.cancel()  # the response completes next: uvicorn then reports a disconnect
        if gone.is_set():
            return
        if finish is None or finish.reason == "cancelled":  # stopped by a shutdown
            raise ApiError(503, "the server is shutting down", type="server_error")
        await JSONResponse(completion(*meta, finish))(scope, None, send)

    async def stream(self, req: ChatRequest, gen: Generation, meta, send, watcher) -> None:
        events = gen.events()
        try:
            first = await anext(events)
        except StopAsyncIteration:
            first = None
        except Exception as e:  # noqa: BLE001 - before any byte is sent: a JSON error with its status
            raise api_error(e) from None
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
                                (b"x-accel-buffering", b"no")]})

        async def put(obj) -> None:
            await send({"type": "http.response.body", "body": sse(obj), "more_body": True})

        await put(chunk(*meta, {"role": "assistant", "content": ""}))
        sent, finish = [], None
        try:
            event = first
            while event is not None:
                if isinstance(event, Delta) and event.text:
                    sent.append(event.text)
                    await put(chunk(*meta, {"content": event.text}))
                elif isinstance(event, Finish):
                    finish = event
                event = await anext(events, None)
        except Exception as e:  # noqa: BLE001 - streaming has started: the error is an event, then the end
            await put(api_error(e).body())
            finish = None
        else:
            if finish is None or finish.reason == "cancelled":
                await put(ApiError(503, "the generation was cancelled (the server is shutting down)", type="server_error").body())
                finish = None
        if finish is not None:
            text = "".join(sent)
            if finish.content.startswith(text) and len(finish.content) > len(text):  # held back, e.g. JSON output
                await put(chunk(*meta, {"content": finish.content[len(text):]}))
            for closing in closing_chunks(*meta, finish):
                await put(closing)
            if req.include_usage:
                await put(usage_chunk(*meta, finish))
            await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": True})
        watcher.cancel()
        await send({"type": "http.response.body", "body": b"", "more_body": False})


class Routes:
    def __init__(self, service: Service):
        self.service = service

    async def health(self, request: Request) -> JSONResponse:
        m = self.service.model
        body = {"status": m.state}
        if m.state == "loading":
            body["progress"] = round(m.progress, 3)
        if m.state == "failed":
            body["error"] = m.error
        return JSONResponse(body, 200 if m.state == "ready" else 503)

    async def models(self, request: Request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": await run_in_threadpool(self._models)})

    async def model(self, request: Request) -> JSONResponse:
        name = request.path_params["name"]
        for obj in await run_in_threadpool(self._models):
            if obj["id"] == name or (obj.get("localmix") and name in self.service.model.aliases):
                return JSONResponse(obj)
        raise ApiError(404, f"the model '{name}' does not exist", param="model", code="model_not_found")

    def _models(self) -> list[dict]:
        """The loaded model first (with localmix's details), then the store's other complete models."""
        from ..models import stored_models

        m = self.service.model
        out = [model_object(m.name, m.created, {"localmix": dict(m.details)})]
        try:
            stored = stored_models()
        except Error:  # no readable store: only what is served
            stored = []
        for s in stored:
            if s.model is not None and s.name != m.name and (m.path is None or s.path != m.path):
                out.append(model_object(s.name, int(s.path.stat().st_mtime)))
        return out


# -- checks before any route ----------------------------------------------------------------------------


def _header(scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")
    return None


def _hostname(host: str) -> str:
    """'localhost:8080' -> 'localhost', '[::1]:8080' -> '[::1]'."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[: host.find("]") + 1]
    return host.rpartition(":")[0] if host.count(":") == 1 else host


async def _refuse(e: ApiError, scope, receive, send, headers: dict | None = None) -> None:
    await error_response(e, headers)(scope, receive, send)


class HostCheck:
    """Against DNS rebinding: a web page whose name resolves to 127.0.0.1 reaches a loopback server with
    its own name in the Host header; only the loopback names are served."""

    def __init__(self, app, hosts: tuple[str, ...]):
        self.app, self.hosts = app, {h.lower() for h in hosts}

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            host = _header(scope, b"host")
            if host is None or _hostname(host) not in self.hosts:
                return await _refuse(ApiError(403, "this server answers only requests addressed to the loopback host "
                                                   f"({', '.join(sorted(self.hosts))})", code="host_not_allowed"),
                                     scope, receive, send)
        await self.app(scope, receive, send)


class KeyCheck:
    """`Authorization: Bearer KEY` on every route but /health, compared in constant time."""

    OPEN = ("/health",)

    def __init__(self, app, key: str):
        self.app, self.key = app, key.encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"] not in self.OPEN:
            given = _header(scope, b"authorization") or ""
            scheme, _, token = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode("latin-1"), self.key):
                why = "a wrong API key" if given else "no API key (send Authorization: Bearer KEY)"
                return await _refuse(ApiError(401, f"this server needs an API key: the request has {why}",
                                              code="invalid_api_key"),
                                     scope, receive, send, {"WWW-Authenticate": "Bearer"})
        await self.app(scope, receive, send)


# -- the app --------------------------------------------------------------------------------------------

HTTP_ERRORS = {404: "not_found", 405: "method_not_allowed"}


async def _http_error(request: Request, e: HTTPException) -> JSONResponse:
    message = {404: f"no route {request.method} {request.url.path}", 405: f"{request.method} is not allowed here"}
    err = ApiError(e.status_code, message.get(e.status_code, str(e.detail)), code=HTTP_ERRORS.get(e.status_code))
    return error_response(err, dict(e.headers or {}))


async def _api_error(request: Request, e: ApiError) -> JSONResponse:
    return error_response(e)


async def _unexpected(request: Request, e: Exception) -> JSONResponse:
    return error_response(api_error(e))


def make_app(model: Model, config: ServerConfig) -> Starlette:
    """The app; `app.state.service` is its Service (stop() it before closing the backend)."""
    service = Service(model, config)
    routes = Routes(service)
    middleware = []
    if config.allowed_hosts is not None:
        middleware.append(Middleware(HostCheck, hosts=config.allowed_hosts))
    if config.cors:  # outside the key check: a browser's preflight carries no key
        middleware.append(Middleware(CORSMiddleware, allow_origins=list(config.cors), allow_methods=["GET", "POST"],
                                     allow_headers=["Authorization", "Content-Type"]))
    if config.api_key:
        middleware.append(Middleware(KeyCheck, key=config.api_key))
    app = Starlette(
        routes=[
            Route("/v1/chat/completions", ChatCompletions(service), methods=["POST"]),
            Route("/v1/models", routes.models, methods=["GET"]),
            Route("/v1/models/{name:path}", routes.model, methods=["GET"]),
            Route("/health", routes.health, methods=["GET"]),
        ],
        middleware=middleware,
        exception_handlers={HTTPException: _http_error, ApiError: _api_error, Exception: _unexpected},
    )
    app.state.service = service
    return app
