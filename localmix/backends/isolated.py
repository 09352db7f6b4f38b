"""The llama.cpp backend in a child process, for a plan that puts experts on workers (`--rpc`).

llama.cpp's RPC client has one answer to every failure of a worker (refused, gone, malformed reply):
GGML_ABORT, the end of the process. So the model runs in a child (multiprocessing "spawn": never a fork of
a process with llama.cpp's threads), and this process survives it: a child that dies turns into one
WorkerError line naming the workers that no longer answer, and the next generate or measure starts a new
child (each worker probed first, so a worker still down gives its own line at once). The tokenizer is the
model's vocabulary, read here: no round trip to the child per tokenize.

The pipe carries, parent to child: ("generate", id, tokens, sampling, grammar), ("measure", id, tokens, n),
("cancel", id); child to parent: ("progress", f), ("loaded", log), ("event", Text | Done), ("fatal",
llama.cpp's abort message), ("end", id, value, error). A cancel is handled by the child's reader thread
while its main thread generates, so that it stops a prompt being evaluated too.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import queue
import re
import signal
import threading
import time
import traceback
from collections.abc import Callable, Iterator

from quantize.errors import Error

from .. import errors, llamacpp
from ..errors import ContextFull, LocalmixError, WorkerError
from ..model_info import ModelInfo
from ..planner import Plan
from ..text import shown
from . import Done, Sampling, Speed, Stats, Text

STOP_WAIT = 3.0  # seconds a child is given to end after SIGTERM (then SIGKILL), and to be reaped
DRAIN_WAIT = 30.0  # seconds an abandoned reply may take to end after its cancel before the child is killed
PROBE_TIMEOUT = 2.0  # seconds a worker has to answer when a child died: is it the one that stopped?
CANCEL_REPEAT = 0.02  # seconds between a cancel's repeats in the child until its request has ended
CANCEL_GRACE = 10.0  # seconds a cancelled reply may take to end before its child is killed (a worker that
# vanished without a reset leaves llama.cpp's RPC client waiting forever: it has no timeouts)
POLL = 0.5  # seconds between looks at a cancel's age while a reply's next piece is awaited


def endpoints(plan: Plan) -> tuple[str, ...]:
    """The workers the plan uses, each once, in order."""
    return tuple(dict.fromkeys(r.endpoint for r in plan.remotes))


def probe_all(endpoints: tuple[str, ...], timeout: float = 5.0) -> None:
    """Every worker answers (rpc.probe), else its one WorkerError line: before llama.cpp connects (and aborts)."""
    if not endpoints:
        return
    from ..rpc import probe

    for e in endpoints:
        probe(e, timeout=timeout)


def answers(endpoint: str, timeout: float = PROBE_TIMEOUT) -> bool:
    from ..rpc import probe

    try:
        probe(endpoint, timeout=timeout)
    except Error:
        return False
    return True


def abort_reason(message: str | None, exitcode: int | None) -> str:
    """llama.cpp's abort message without its source location ("ggml-rpc.cpp:640: "), else how the child ended."""
    if message:
        return shown(re.sub(r"^\S+:\d+: ", "", " ".join(message.split())), 300)
    if exitcode is not None and exitcode < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-exitcode).name}"
    return f"exit status {exitcode}"


def stopped_error(when: str, reason: str, workers: tuple[str, ...], gone: list[str]) -> LocalmixError:
    """One line for a child that died `when` ("during the reply"): the workers that no longer answer, or
    every worker of the plan when all still do (the link failed), or llama.cpp alone without workers."""
    if not workers:
        return LocalmixError(f"llama.cpp stopped {when} ({reason})")
    if gone:
        return WorkerError(f"{'worker' if len(gone) == 1 else 'workers'} {', '.join(gone)} stopped answering {when} "
                           f"(llama.cpp: {reason})")
    return WorkerError(f"the link to {'worker' if len(workers) == 1 else 'workers'} {', '.join(workers)} failed {when} "
                       f"(llama.cpp: {reason})")


def rebuilt(error: tuple[str, str, str]) -> BaseException:
    """The child's exception in this process: an expected one as the same class (one line), any other as
    a RuntimeError with the child's traceback (a bug)."""
    kind, name, text = error
    if kind == "crash":
        return RuntimeError(f"in the model's process:\n{text}")
    cls = getattr(errors, name, None)
    if not (isinstance(cls, type) and issubclass(cls, Error)):
        cls = LocalmixError
    e = cls.__new__(cls)  # not its __init__: some take other arguments (NotInStore)
    e.args = (text,)
    return e


# -- the child ------------------------------------------------------------------------------------------


def _serve(conn, info: ModelInfo, plan: Plan, ctx: int, kv_type: str, threads: int | None, verbose: bool,
           repack: bool = True) -> None:
    """The child's life: load, then answer requests until the parent closes the pipe."""
    from .llama import LlamaBackend

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle (it cancels or closes)
    send_lock = threading.Lock()

    def send(*msg) -> None:
        if send_lock.acquire(timeout=5):  # bounded: an abort may come from a thread that is sending
            try:
                conn.send(msg)
            finally:
                send_lock.release()

    llamacpp.on_fatal(lambda message: send("fatal", message))
    backend = LlamaBackend(info, plan, ctx=ctx, kv_type=kv_type, threads=threads, verbose=verbose, repack=repack)
    try:
        backend.load(lambda f: send("progress", f))
    except Exception as e:  # noqa: BLE001 - handed to the parent
        send("end", 0, None, _error(e))
        return
    send("loaded", list(backend.load_log))
    requests: queue.Queue = queue.Queue()
    state = _State()
    threading.Thread(target=_read, args=(conn, requests, state, backend), name="localmix-requests", daemon=True).start()
    while (msg := requests.get()) is not None:
        kind, rid, *args = msg
        with state.lock:
            state.current = rid
        value, error = None, None
        try:
            if kind == "generate":
                for event in backend.generate(*args):
                    send("event", event)
            else:
                value = backend.measure(*args)
        except Exception as e:  # noqa: BLE001 - handed to the parent
            error = _error(e)
        with state.lock:
            state.current, state.done = None, rid
        send("end", rid, value, error)
    backend.close()


class _State:
    """Which request the child's main thread is running, and the last it finished."""

    def __init__(self):
        self.lock = threading.Lock()
        self.current: int | None = None
        self.done = 0


def _read(conn, requests: queue.Queue, state: _State, backend) -> None:
    """The child's reader: requests to the main thread, cancels done at once. A cancel is repeated until its
    request has ended: one that arrives before the request's generate() starts would be cleared by it."""
    pending = 0  # the request a cancel was asked for (0: none)
    while True:
        if pending:
            with state.lock:
                if state.done >= pending:
                    pending = 0
                elif state.current == pending:
                    backend.cancel()
        try:
            if not conn.poll(CANCEL_REPEAT if pending else None):
                continue
            msg = conn.recv()
        except (EOFError, OSError):  # the parent is gone: stop what runs and end, by force if it is stuck
            backend.cancel()
            requests.put(None)
            threading.Timer(STOP_WAIT, os._exit, (0,)).start()
            return
        if msg[0] == "cancel":
            pending = max(pending, msg[1])
        else:
            requests.put(msg)


def _error(e: BaseException) -> tuple[str, str, str]:
    if isinstance(e, Error):
        return ("error", type(e).__name__, str(e))
    return ("crash", type(e).__name__, traceback.format_exc())


# -- the parent -----------------------------------------------------------------------------------------


class _Died(Exception):
    """The child's end of the pipe closed: it died (or was stopped)."""


class _Child:
    """One child process and this end of its pipe."""

    def __init__(self, proc, conn):
        self.proc, self.conn = proc, conn
        self.send_lock = threading.Lock()
        self.fatal: str | None = None  # llama.cpp's abort message, when it sent one
        self.exitcode: int | None = None
        self.stopped = False

    def send(self, msg) -> bool:
        with self.send_lock:
            try:
                self.conn.send(msg)
                return True
            except (OSError, ValueError):  # the child is gone (or stopped): its death is read by recv
                return False

    def recv(self, timeout: float | None = None):
        """The next message other than "fatal" (kept); None when `timeout` passes first; _Died at EOF."""
        while True:
            try:
                if timeout is not None and not self.conn.poll(timeout):
                    return None
                msg = self.conn.recv()
            except (EOFError, OSError, ValueError):
                raise _Died from None
            if msg[0] != "fatal":
                return msg
            self.fatal = msg[1]

    def stop(self) -> None:
        """End the process (SIGTERM, bounded wait, SIGKILL), reap it and close the pipe: safe to repeat."""
        with self.send_lock:
            if self.stopped:
                return
            self.stopped = True
        proc = self.proc
        if proc.is_alive():
            proc.terminate()
            proc.join(STOP_WAIT)
        if proc.is_alive():
            proc.kill()
            proc.join(STOP_WAIT)
        self.exitcode = proc.exitcode
        with self.send_lock:
            self.conn.close()
        with contextlib.suppress(ValueError):  # still running after SIGKILL and the wait: leave its handle
            proc.close()

    def reap(self) -> None:
        """After EOF: the process has ended or is ending (an abort takes a moment); wait for it, bounded,
        so that its exit code is its own, then release it."""
        with contextlib.suppress(ValueError):  # already released
            self.proc.join(STOP_WAIT)
        self.stop()


class IsolatedBackend:
    """LlamaBackend's protocol with the model in a child process (see the module's docstring)."""

    def __init__(self, info: ModelInfo, plan: Plan, *, ctx: int, kv_type: str = "f16", threads: int | None = None,
                 verbose: bool = False, repack: bool = True):
        self.info, self.plan, self.ctx, self.kv_type = info, plan, ctx, kv_type
        self.threads, self.verbose, self.repack = threads, verbose, repack
        self._child: _Child | None = None
        self._vocab = None
        self._log: list[str] = []
        self._lock = threading.Lock()  # the fields below and _child
        self._start_lock = threading.Lock()  # one child started at a time
        self._last_id = 0
        self._active: int | None = None  # the request generate() is running
        self._cancelled_at: float | None = None  # when a cancel of it was asked for
        self._closed = False

    @property
    def workers(self) -> tuple[str, ...]:
        return endpoints(self.plan)

    @property
    def tokenizer(self):
        if self._vocab is None:
            self._vocab = llamacpp.Engine.vocab_only(self.info.path)
        return self._vocab

    @property
    def load_log(self) -> list[str]:
        return self._log

    @property
    def pid(self) -> int | None:
        """The child's process id while it runs (tests kill it to stand in for a worker's abort)."""
        child = self._child
        return child.proc.pid if child is not None and not child.stopped else None

    def load(self, progress: Callable[[float], None] | None = None) -> None:
        """Probe the workers, start the child and wait for its load. WorkerError, or the child's own error
        (ModelFileError with llama.cpp's reason), as one line."""
        self.tokenizer  # noqa: B018 - read now: a file llama.cpp refuses says so before a child starts
        self._ready(progress)

    def _ready(self, progress: Callable[[float], None] | None = None) -> _Child:
        with self._start_lock:
            if self._closed:
                raise LocalmixError("the model was closed")
            child = self._child
            if child is not None:
                return child
            probe_all(self.workers)
            ctx = multiprocessing.get_context("spawn")
            here, there = ctx.Pipe(duplex=True)
            proc = ctx.Process(target=_serve, name="localmix-model", daemon=True,
                               args=(there, self.info, self.plan, self.ctx, self.kv_type, self.threads, self.verbose, self.repack))
            try:
                proc.start()
            finally:
                there.close()  # the child's copy is the only one left: its death is an EOF here
            child = _Child(proc, here)
            with self._lock:
                self._child = child  # close() from another thread stops a load too
            try:
                while True:
                    msg = child.recv()
                    if msg[0] == "progress":
                        if progress:
                            progress(msg[1])
                    elif msg[0] == "loaded":
                        self._log = msg[1]
                        return child
                    else:  # ("end", 0, None, error): the load failed
                        raise rebuilt(msg[3])
            except _Died:
                raise self._died(child, "while loading the model") from None
            except BaseException:
                self._forget(child)
                raise

    def _forget(self, child: _Child, died: bool = False) -> None:
        """This child is no more: the next request starts a new one."""
        with self._lock:
            if self._child is child:
                self._child = None
        if died:
            child.reap()
        else:
            child.stop()

    def _died(self, child: _Child, when: str) -> BaseException:
        self._forget(child, died=True)
        if self._closed:
            return LocalmixError("the model was closed")
        workers = self.workers
        gone = [e for e in workers if not answers(e)]
        return stopped_error(when, abort_reason(child.fatal, child.exitcode), workers, gone)

    def cancel(self) -> None:
        with self._lock:
            child, rid = self._child, self._active
            if rid is not None and self._cancelled_at is None:
                self._cancelled_at = time.monotonic()
        if child is not None and rid is not None:
            child.send(("cancel", rid))

    def _request(self, kind: str, *args) -> tuple[_Child, int]:
        child = self._ready()
        with self._lock:
            self._last_id += 1
            rid = self._last_id
            if kind == "generate":
                self._active, self._cancelled_at = rid, None
        child.send((kind, rid, *args))
        return child, rid

    def generate(self, tokens: list[int], sampling: Sampling, grammar: str | None = None) -> Iterator[Text | Done]:
        if len(tokens) >= self.ctx:
            raise ContextFull(f"the prompt has {len(tokens)} tokens, the context holds {self.ctx}")
        child, rid = self._request("generate", tokens, sampling, grammar)
        ended = False
        try:
            while True:
                msg = child.recv(POLL)
                if msg is None:
                    if self._cancelled_at is not None and time.monotonic() - self._cancelled_at > CANCEL_GRACE:
                        ended = True  # stuck (a worker gone silent): the child goes, the reply ends as cancelled
                        self._forget(child)
                        yield Done(Stats(ctx_total=self.ctx, stop="cancelled"))
                        return
                elif msg[0] == "event":
                    yield msg[1]
                elif msg[0] == "end":
                    ended = True
                    if msg[3] is not None:
                        raise rebuilt(msg[3])
                    return
        except _Died:
            ended = True
            if self._closed:  # closed from another thread: the reply ends as a cancelled one
                yield Done(Stats(ctx_total=self.ctx, stop="cancelled"))
                return
            raise self._died(child, "during the reply") from None
        finally:
            with self._lock:
                self._active = self._cancelled_at = None
            if not ended:  # abandoned by the caller: stop it, and read up to its end to keep the pipe in step
                self._drain(child, rid)

    def _drain(self, child: _Child, rid: int) -> None:
        child.send(("cancel", rid))
        try:
            while (msg := child.recv(DRAIN_WAIT)) is not None:
                if msg[0] == "end":
                    return
        except _Died:
            pass
        self._forget(child)  # it died, or did not stop: the next request starts a new one

    def measure(self, prompt_tokens: list[int], gen_tokens: int) -> Speed:
        child, _ = self._request("measure", prompt_tokens, gen_tokens)
        try:
            while (msg := child.recv())[0] != "end":
                pass
        except _Died:
            raise self._died(child, "while measuring") from None
        except BaseException:  # Ctrl-C: the child cannot be stopped mid-measure, nor left out of step
            self._forget(child)
            raise
        if msg[3] is not None:
            raise rebuilt(msg[3])
        return msg[2]

    def close(self) -> None:
        with self._lock:
            self._closed = True
            child, self._child = self._child, None
        if child is not None:
            child.stop()
        vocab, self._vocab = self._vocab, None
        if vocab is not None:
            vocab.close()
