"""A ChatBackend that speaks the OpenAI API over HTTP: `localmix chat --server URL` with a `localmix serve`
on another machine, or with Ollama, llama-server, LM Studio. Standard library only (http.client), so
chatting with a server needs no extra package.

The server owns the prompt: its template, its tool format and its context. This backend turns localmix
messages into OpenAI ones, streams the reply (server-sent events), puts the pieces of tool calls back
together (OpenAI and Ollama send a call's arguments in pieces) and reports the numbers the server gives
(usage) with the times measured here. A localmix server's model objects carry a "localmix" field (plan
summary, CPU/GPU split, context); other servers' do not, and their context is then unknown (0)."""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from urllib.parse import urlsplit

from ..errors import LocalmixError, ToolCallError
from ..text import shown
from . import Done, Sampling, Stats, Text, ToolCalls

DEFAULT_TIMEOUT = 600.0  # seconds a read may wait: a long prompt on a CPU-only server is slow to start
LOAD_TIMEOUT = 30.0  # for the model list: a server that takes longer is as good as unreachable
MAX_ERROR_BODY = 1 << 16
MAX_LISTING = 1 << 22  # a model list, /health
READY_TIMEOUT = 3600.0  # seconds to wait for a localmix server still loading its model (a big one from a slow disk)
READY_POLL = 0.5
NETWORK_ERRORS = (OSError, http.client.HTTPException, ssl.SSLError)

# OpenAI's finish_reason -> Stats.stop. Tool calls end the generation the way an EOS does.
STOPS = {"stop": "eos", "tool_calls": "eos", "function_call": "eos", "content_filter": "eos", "length": "length"}


# -- the pure parts: URLs, messages, requests, server-sent events ---------------------------------------


def split_url(url: str) -> tuple[str, str, int, str]:
    """(scheme, host, port, base path ending in /v1) of a server URL given with or without /v1 and scheme."""
    text = url.strip()
    parts = urlsplit(text if "://" in text else f"http://{text}")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise LocalmixError(f"--server {shown(url)}: not an http:// or https:// URL")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise LocalmixError(f"--server {shown(url)}: the port is not a number from 1 to 65535") from None
    path = parts.path.rstrip("/")
    return parts.scheme, parts.hostname, port, path if path.endswith("/v1") else f"{path}/v1"


def openai_message(m: dict) -> dict:
    """A localmix message (localmix/prompt/__init__.py) as OpenAI's: calls with ids and JSON-string arguments,
    tool results by the id of their call."""
    if m["role"] == "tool":
        return {"role": "tool", "tool_call_id": m["tool_call_id"], "content": m.get("content", "")}
    out = {"role": m["role"], "content": m.get("content", "")}
    if m.get("tool_calls"):
        out["tool_calls"] = openai_tool_calls(m["tool_calls"])
        if not out["content"]:
            del out["content"]  # OpenAI: content may be left out of a message that calls tools
    return out


def openai_tool_calls(calls: list[dict], *, indexed: bool = False) -> list[dict]:
    """localmix calls as OpenAI's tool_calls (arguments as JSON text); `indexed`: with each call's
    "index", as a stream's delta carries them."""
    return [{**({"index": k} if indexed else {}), "id": c["id"], "type": "function",
             "function": {"name": c["name"], "arguments": json.dumps(c["arguments"], ensure_ascii=False)}}
            for k, c in enumerate(calls)]


def tool_choice(choice: str) -> str | dict:
    return choice if choice in ("auto", "none", "required") else {"type": "function", "function": {"name": choice}}


def request_body(model: str, messages: list[dict], tools: list[dict] | None, choice: str, sampling: Sampling) -> dict:
    body = {"model": model, "messages": [openai_message(m) for m in messages], "stream": True,
            "stream_options": {"include_usage": True}, "temperature": sampling.temperature, "top_p": sampling.top_p,
            "max_tokens": sampling.max_tokens}
    if sampling.seed is not None:
        body["seed"] = sampling.seed
    for name in ("frequency_penalty", "presence_penalty"):  # only when set: not every server knows them
        if getattr(sampling, name, 0.0):
            body[name] = getattr(sampling, name)
    if tools:
        body["tools"] = [{"type": "function", "function": spec} for spec in tools]
        body["tool_choice"] = tool_choice(choice)
    return body


def sse_data(lines: Iterable[bytes]) -> Iterator[str]:
    """The data of each server-sent event, as the lines arrive (comments and other fields skipped; an
    event's data lines joined by newlines, as the SSE standard says). Stops at `[DONE]`."""
    data: list[str] = []
    for raw in lines:
        line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
        if not line:
            if data:
                payload, data = "\n".join(data), []
                if payload.strip() == "[DONE]":
                    return
                yield payload
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
        elif line.startswith("error:"):  # llama-server's way of reporting an error mid-stream
            data.append(json.dumps({"error": line[6:].strip()}))
    if data and "\n".join(data).strip() != "[DONE]":
        yield "\n".join(data)


def error_message(body: object) -> str | None:
    """The message of an error body in OpenAI's shape ({"error": {"message"}}) or the looser ones of other
    servers ({"error": "..."}, {"detail": "..."}); None when there is none."""
    if not isinstance(body, dict):
        return None
    err = body.get("error", body.get("detail"))
    if isinstance(err, str) and err.strip().startswith("{"):
        try:
            err = json.loads(err)
        except ValueError:
            pass
    if isinstance(err, dict):
        err = err.get("message", err)
    return None if err is None else str(err)


class Calls:
    """Tool calls put together from stream deltas: by index, a call's id and name come once, its
    arguments in pieces."""

    def __init__(self):
        self.parts: dict[int, dict] = {}

    def add(self, deltas: list) -> None:
        for position, d in enumerate(deltas):
            if not isinstance(d, dict):
                continue
            index = d.get("index", position)
            call = self.parts.setdefault(index if isinstance(index, int) else position, {"id": "", "name": "", "arguments": ""})
            fn = d.get("function") if isinstance(d.get("function"), dict) else {}
            call["id"] = d.get("id") if isinstance(d.get("id"), str) and d["id"] else call["id"]
            call["name"] = fn.get("name") if isinstance(fn.get("name"), str) and fn["name"] else call["name"]
            args = fn.get("arguments")
            if isinstance(args, dict):  # some servers send the object itself
                args = json.dumps(args)
            call["arguments"] += args if isinstance(args, str) else ""

    def calls(self) -> list[dict]:
        out = []
        for _, c in sorted(self.parts.items()):
            if not c["name"]:
                raise ToolCallError("the server sent a tool call without a function name")
            try:
                args = json.loads(c["arguments"]) if c["arguments"].strip() else {}
            except ValueError:
                args = None
            if not isinstance(args, dict):
                raise ToolCallError(f"the server's call of {shown(c['name'])} has arguments that are not a JSON object: "
                                    f"{shown(c['arguments'])}")
            out.append({"id": c["id"] or f"call_{uuid.uuid4().hex[:9]}", "name": c["name"], "arguments": args})
        return out


# -- the backend ------------------------------------------------------------------------------------------


class OpenAIBackend:
    """`url`: the server, with or without /v1 (http://host:port, https://...); `model`: one the server
    lists (None: the first listed); `api_key`: sent as a bearer token. `timeout`: seconds any read may wait."""

    def __init__(self, url: str, model: str | None = None, api_key: str | None = None, timeout: float = DEFAULT_TIMEOUT):
        self.scheme, self.host, self.port, self.base = split_url(url)
        self.where = f"{self.host}:{self.port}" if ":" not in self.host else f"[{self.host}]:{self.port}"
        self.url = f"{self.scheme}://{self.where}{self.base.removesuffix('/v1')}"  # as shown: no user:password@ from the URL
        self.model, self.api_key, self.timeout = model, api_key, timeout
        self.ctx = 0  # the server's context window; 0 when it does not say
        self.details: dict = {}  # a localmix server's {"plan", "split", "ctx"}
        self.models: list[str] = []  # what the server lists
        self._lock = threading.Lock()
        self._conn: http.client.HTTPConnection | None = None  # the connection of the reply being streamed
        self._cancel = threading.Event()

    # -- HTTP ------------------------------------------------------------------------------------------------

    def _connection(self, timeout: float) -> http.client.HTTPConnection:
        if self.scheme == "https":
            return http.client.HTTPSConnection(self.host, self.port, timeout=timeout, context=ssl.create_default_context())
        return http.client.HTTPConnection(self.host, self.port, timeout=timeout)

    def _headers(self) -> dict:
        h = {"Accept": "application/json, text/event-stream", "User-Agent": "localmix"}
        if self.api_key:
            h["Authorization"] = f"Bearer {self.api_key}"
        return h

    def _unreachable(self, e: BaseException) -> LocalmixError:
        reason = getattr(e, "strerror", None) or str(e) or type(e).__name__  # "Connection refused", not "[Errno 111] ..."
        if isinstance(e, (TimeoutError, socket.timeout)):
            reason = "no answer (timed out)"
        return LocalmixError(f"cannot reach the server at {shown(self.url)}: {shown(reason)}")

    def _refused(self, status: int, reason: str, body: bytes) -> LocalmixError:
        """A non-2xx answer as one line: the server's own message where it sent one."""
        if status == 401:
            return LocalmixError(f"the server at {shown(self.url)} " + (
                "refused the API key (--api-key, LOCALMIX_API_KEY or OPENAI_API_KEY)" if self.api_key else
                "needs an API key: --api-key KEY, or LOCALMIX_API_KEY / OPENAI_API_KEY in the environment"))
        try:
            message = error_message(json.loads(body))
        except ValueError:
            message = None
        message = message or body.decode("utf-8", errors="replace").strip() or reason
        return LocalmixError(f"the server at {shown(self.url)} says ({status}): {shown(message, 500)}")

    # -- ChatBackend -----------------------------------------------------------------------------------------

    def _get(self, path: str) -> tuple[int, str, bytes]:
        """GET `path` on the server: (status, reason, body); unreachable: one line."""
        conn = self._connection(min(self.timeout, LOAD_TIMEOUT))
        try:
            conn.request("GET", path, headers=self._headers())
            resp = conn.getresponse()
            return resp.status, resp.reason, resp.read(MAX_LISTING)
        except NETWORK_ERRORS as e:
            raise self._unreachable(e) from None
        finally:
            conn.close()

    def load(self, progress: Callable[[float], None] | None = None) -> None:
        """Asks the server for its models: the one to chat with must be listed (None: the first). A localmix
        server still loading its model is waited for (its /health gives the progress)."""
        status, reason, body = self._get(f"{self.base}/models")
        if status != 200:
            raise self._refused(status, reason, body)
        try:
            listed = json.loads(body)["data"]
            entries = [m for m in listed if isinstance(m, dict) and isinstance(m.get("id"), str)]
        except (ValueError, KeyError, TypeError):
            raise LocalmixError(f"{shown(self.url)} does not answer GET {self.base}/models as an OpenAI-compatible "
                                f"server does") from None
        self.models = [m["id"] for m in entries]
        if not entries:
            raise LocalmixError(f"the server at {shown(self.url)} lists no models")
        found = self._find(entries)
        self.model = found["id"]
        extra = found.get("localmix")
        served = next((m["id"] for m in entries if isinstance(m.get("localmix"), dict)), None)
        if served is not None and not isinstance(extra, dict):  # a localmix server lists its store too
            raise LocalmixError(f"the server at {shown(self.url)} serves {shown(served)}; {shown(self.model)} is in its "
                                f"store but not loaded (start localmix serve with it)")
        self.details = extra if isinstance(extra, dict) else {}
        ctx = self.details.get("ctx")
        self.ctx = ctx if isinstance(ctx, int) and ctx > 0 else 0
        if served is not None:
            self._wait_ready(progress)
        if progress is not None:
            progress(1.0)

    def _wait_ready(self, progress: Callable[[float], None] | None) -> None:
        """Until a localmix server's model is loaded (bounded in time; close() stops the wait)."""
        health = f"{self.base.removesuffix('/v1')}/health"
        self._cancel.clear()
        end = time.monotonic() + READY_TIMEOUT
        while True:
            try:
                state = json.loads(self._get(health)[2])
            except ValueError:
                state = None
            if not isinstance(state, dict) or state.get("status") not in ("loading", "failed"):
                return  # ready, or no /health to ask: the chat request will say
            if state["status"] == "failed":
                raise LocalmixError(f"the server at {shown(self.url)} could not load its model: "
                                    f"{shown(state.get('error') or 'no reason given', 500)}")
            if progress is not None and isinstance(state.get("progress"), (int, float)):
                progress(min(max(float(state["progress"]), 0.0), 1.0))
            if time.monotonic() > end or self._cancel.wait(READY_POLL):
                raise LocalmixError(f"the server at {shown(self.url)} is still loading its model; try again later")

    def _find(self, entries: list[dict]) -> dict:
        if self.model is None:
            return entries[0]
        by_id = {m["id"]: m for m in entries}
        for name in (self.model, f"{self.model}:latest"):  # Ollama's names carry a tag
            if name in by_id:
                return by_id[name]
        listed = ", ".join(shown(i, 80) for i in self.models[:20]) + (", ..." if len(self.models) > 20 else "")
        raise LocalmixError(f"the server at {shown(self.url)} has no model {shown(self.model)}; it has: {listed}")

    def chat(self, messages: list[dict], tools: list[dict] | None, choice: str, sampling: Sampling
             ) -> Iterator[Text | ToolCalls | Done]:
        """A Round (localmix.backends): the reply streamed, the calls put together, then one Done."""
        self._cancel.clear()
        body = json.dumps(request_body(self.model or "", messages, tools, choice, sampling), ensure_ascii=False).encode()
        conn = self._connection(self.timeout)
        with self._lock:
            self._conn = conn
        t0 = time.perf_counter()
        try:
            yield from self._stream(conn, body, t0)
        finally:
            with self._lock:
                self._conn = None
            conn.close()

    def _stream(self, conn: http.client.HTTPConnection, body: bytes, t0: float) -> Iterator[Text | ToolCalls | Done]:
        calls, usage, finish = Calls(), {}, None
        first = last = None
        pieces = 0
        try:
            conn.connect()
            with self._lock:  # a cancel that came before the socket existed is seen here; one after, shuts it
                if self._cancel.is_set():
                    raise ConnectionAbortedError("cancelled")
            conn.request("POST", f"{self.base}/chat/completions", body=body,
                         headers={**self._headers(), "Content-Type": "application/json"})
            resp = conn.getresponse()
            if resp.status != 200:
                raise self._refused(resp.status, resp.reason, resp.read(MAX_ERROR_BODY))
            for chunk in self._chunks(resp):
                if self._cancel.is_set():  # asked before the socket existed, or between two reads
                    break
                if isinstance(chunk.get("usage"), dict):
                    usage = chunk["usage"]
                for choice in chunk.get("choices") or []:
                    delta = choice.get("delta", choice.get("message")) if isinstance(choice, dict) else None
                    if not isinstance(delta, dict):
                        continue
                    text = delta.get("content") if isinstance(delta.get("content"), str) else ""
                    deltas = delta.get("tool_calls") if isinstance(delta.get("tool_calls"), list) else []
                    if text or deltas:
                        last = time.perf_counter()
                        first = first or last
                        pieces += 1
                    calls.add(deltas)
                    if text:
                        yield Text(text)
                    finish = choice.get("finish_reason") or finish
        except NETWORK_ERRORS as e:
            if not self._cancel.is_set():
                raise self._unreachable(e) from None
        if self._cancel.is_set():
            finish = "cancelled"
        elif finish is None:
            raise LocalmixError(f"the server at {shown(self.url)} ended the reply without saying why (cut off?)")
        if calls.parts and finish != "cancelled":
            yield ToolCalls(calls.calls())
        yield Done(self._stats(usage, finish, t0, first, last, pieces))

    def _chunks(self, resp: http.client.HTTPResponse) -> Iterator[dict]:
        """The stream's chunk objects as they come; a server that answered with one completion instead of a
        stream gives it as one chunk (its message read as the delta). An error object: the server's words."""
        if resp.getheader("Content-Type", "").startswith("application/json"):
            datas: Iterable[str] = [resp.read(MAX_LISTING).decode("utf-8", errors="replace")]
        else:
            datas = sse_data(iter(resp.readline, b""))
        for data in datas:
            try:
                chunk = json.loads(data)
            except ValueError:
                raise LocalmixError(f"the server at {shown(self.url)} sent an event that is not JSON: {shown(data)}") from None
            if not isinstance(chunk, dict):
                continue
            if (message := error_message(chunk)) is not None and "choices" not in chunk:
                raise LocalmixError(f"the server at {shown(self.url)} says: {shown(message, 500)}")
            yield chunk

    def _stats(self, usage: dict, finish: str, t0: float, first: float | None, last: float | None, pieces: int) -> Stats:
        def count(d: object, key: str) -> int:
            v = d.get(key) if isinstance(d, dict) else None
            return v if isinstance(v, int) and v >= 0 else 0

        prompt, cached = count(usage, "prompt_tokens"), count(usage.get("prompt_tokens_details"), "cached_tokens")
        gen = count(usage, "completion_tokens") if usage else pieces  # no usage: about a token per piece
        ttft = (first - t0) if first else 0.0
        return Stats(prompt_tokens=max(prompt - cached, 0), cached_tokens=cached, prompt_seconds=ttft, gen_tokens=gen,
                     gen_seconds=(last - first) if first and last else 0.0, ttft=ttft, ctx_used=prompt + gen,
                     ctx_total=self.ctx, stop="cancelled" if finish == "cancelled" else STOPS.get(finish, "eos"))

    def cancel(self) -> None:
        """From any thread: the stream's socket is shut, so the read waiting on it ends now (and the server
        sees the client go, which cancels its generation)."""
        self._cancel.set()
        with self._lock:
            sock = self._conn.sock if self._conn is not None else None
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already closed

    def close(self) -> None:
        self.cancel()
