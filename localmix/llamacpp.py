"""The one adapter to llama-cpp-python. Everything localmix needs beyond its public `Llama` API sits here:
libggml through ctypes (devices, the CPU buffer type), the default-params hook that carries tensor
overrides and a progress callback into `Llama()`, llama.cpp's log, its perf counters, token pieces and
the private attributes behind KV-cache reuse. When llama-cpp-python changes, this file changes.

It knows nothing of plans, prompts or the UI: it is given regex patterns, tokens and sampling numbers.
"""

from __future__ import annotations

import ctypes
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from .errors import ModelFileError, WorkerError
from .text import shown

GGML_DEVICE_TYPE_CPU, GGML_DEVICE_TYPE_GPU, GGML_DEVICE_TYPE_IGPU = 0, 1, 2
KV_TYPES = {"f16": 1, "q8_0": 8, "q4_0": 2}  # --kv-type -> ggml_type id for type_k / type_v

_params_lock = threading.Lock()  # the default-params hook is process-wide while a model loads


# -- libggml: devices -------------------------------------------------------------------------------------


@cache
def libggml():
    from llama_cpp import _ggml

    g = _ggml.libggml
    g.ggml_backend_dev_count.restype = ctypes.c_size_t
    g.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
    g.ggml_backend_dev_get.restype = ctypes.c_void_p
    g.ggml_backend_dev_name.argtypes = [ctypes.c_void_p]
    g.ggml_backend_dev_name.restype = ctypes.c_char_p
    g.ggml_backend_dev_description.argtypes = [ctypes.c_void_p]
    g.ggml_backend_dev_description.restype = ctypes.c_char_p
    g.ggml_backend_dev_type.argtypes = [ctypes.c_void_p]
    g.ggml_backend_dev_type.restype = ctypes.c_int
    g.ggml_backend_dev_memory.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t), ctypes.POINTER(ctypes.c_size_t)]
    g.ggml_backend_dev_memory.restype = None
    g.ggml_backend_dev_by_type.argtypes = [ctypes.c_int]
    g.ggml_backend_dev_by_type.restype = ctypes.c_void_p
    g.ggml_backend_dev_buffer_type.argtypes = [ctypes.c_void_p]
    g.ggml_backend_dev_buffer_type.restype = ctypes.c_void_p
    return g


def gpu_devices() -> list[tuple[str, int, int]]:
    """(name, free bytes, total bytes) of every GPU llama.cpp can use."""
    g = libggml()
    out = []
    for i in range(g.ggml_backend_dev_count()):
        dev = g.ggml_backend_dev_get(i)
        if g.ggml_backend_dev_type(dev) not in (GGML_DEVICE_TYPE_GPU, GGML_DEVICE_TYPE_IGPU):
            continue
        free, total = ctypes.c_size_t(), ctypes.c_size_t()
        g.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
        name = (g.ggml_backend_dev_description(dev) or g.ggml_backend_dev_name(dev) or b"GPU").decode(errors="replace")
        out.append((name, free.value, total.value))
    return out


def cpu_buffer_type() -> int:
    """llama.cpp's host-memory buffer type, the value a `tensor_buft_overrides` entry names for "CPU"."""
    g = libggml()
    return g.ggml_backend_dev_buffer_type(g.ggml_backend_dev_by_type(GGML_DEVICE_TYPE_CPU))


# -- libggml: the RPC backend (workers) ------------------------------------------------------------------

# llama-cpp-python version -> the RPC protocol of the llama.cpp it bundles (ggml-rpc.h RPC_PROTO_*_VERSION;
# tests/test_rpc.py holds a live worker's HELLO to it). A worker must have the same major and a minor no
# greater than the client's, or llama.cpp aborts the client.
RPC_PROTOCOLS = {"0.3.36": (7, 0, 0)}

_RPC_BUILD_HINT = ('CMAKE_ARGS="-DGGML_RPC=on" pip install --force-reinstall --no-cache-dir llama-cpp-python '
                   "(or pipx install --force localmix with the same CMAKE_ARGS)")


def rpc_protocol() -> tuple[int, int, int] | None:
    """The RPC protocol this llama-cpp-python's llama.cpp speaks, from the table (None: a version not in it).
    Read from the distribution's metadata: no library is loaded."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return RPC_PROTOCOLS.get(version("llama_cpp_python"))
    except PackageNotFoundError:
        return None


@cache
def _rpc_reg() -> int | None:
    """The RPC backend's registry entry (None: llama.cpp was built without GGML_RPC)."""
    g = libggml()
    g.ggml_backend_reg_by_name.argtypes = [ctypes.c_char_p]
    g.ggml_backend_reg_by_name.restype = ctypes.c_void_p
    g.ggml_backend_reg_get_proc_address.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    g.ggml_backend_reg_get_proc_address.restype = ctypes.c_void_p
    g.ggml_backend_reg_dev_get.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    g.ggml_backend_reg_dev_get.restype = ctypes.c_void_p
    g.ggml_backend_buft_name.argtypes = [ctypes.c_void_p]
    g.ggml_backend_buft_name.restype = ctypes.c_char_p
    return g.ggml_backend_reg_by_name(b"RPC") or None


def _rpc_proc(name: str, prototype):
    """A function of the RPC backend, found as llama.cpp's own tools find it (through the registry, so a
    build that loads backends as plugins works too)."""
    address = libggml().ggml_backend_reg_get_proc_address(_rpc_reg(), name.encode())
    if not address:
        raise WorkerError(f"this llama.cpp's RPC backend has no {name}; reinstall llama-cpp-python: {_RPC_BUILD_HINT}")
    return prototype(address)


def supports_rpc() -> bool:
    """This llama.cpp has the RPC backend (llama-cpp-python built with GGML_RPC on)."""
    return _rpc_reg() is not None


def require_rpc() -> None:
    if not supports_rpc():
        raise WorkerError(f"this llama.cpp was built without the RPC backend; reinstall it with it: {_RPC_BUILD_HINT}")


def local_gpus() -> list[int]:
    """The GPUs llama.cpp uses by default (llama_prepare_model_devices): discrete ones in its order,
    integrated ones (of one backend) only when there is no discrete one. (It also drops a GPU that a
    second backend lists again under the same device id; builds with one GPU backend have none such.)"""
    g = libggml()
    devs = [g.ggml_backend_dev_get(i) for i in range(g.ggml_backend_dev_count())]
    gpus = [d for d in devs if g.ggml_backend_dev_type(d) == GGML_DEVICE_TYPE_GPU]
    if gpus:
        return gpus
    igpus = [d for d in devs if g.ggml_backend_dev_type(d) == GGML_DEVICE_TYPE_IGPU]
    return igpus[:1] + [d for d in igpus[1:] if _dev_reg(d) == _dev_reg(igpus[0])]


def _dev_reg(dev: int) -> int:
    g = libggml()
    g.ggml_backend_dev_backend_reg.argtypes = [ctypes.c_void_p]
    g.ggml_backend_dev_backend_reg.restype = ctypes.c_void_p
    return g.ggml_backend_dev_backend_reg(dev)


def serve_devices() -> list[int]:
    """What a worker serves: this machine's GPUs (as a load here would use them), then its CPU last."""
    return [*local_gpus(), libggml().ggml_backend_dev_by_type(GGML_DEVICE_TYPE_CPU)]


_START_SERVER = ctypes.CFUNCTYPE(None, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_size_t,
                                 ctypes.POINTER(ctypes.c_void_p))


def serve_rpc(endpoint: str, cache_dir: str | None, threads: int) -> None:
    """Serve this machine's devices (serve_devices) to RPC clients on `endpoint` (an IPv4 "a.b.c.d:port":
    llama.cpp binds nothing else): llama.cpp's accept loop, one client at a time. It never returns while it
    serves; it returns at once when it cannot start (it printed why on C's stderr). Its banner and a line
    per client go to C's stdout."""
    require_rpc()
    start = _rpc_proc("ggml_backend_rpc_start_server", _START_SERVER)
    devices = serve_devices()
    array = (ctypes.c_void_p * len(devices))(*devices)
    start(endpoint.encode(), cache_dir.encode() if cache_dir else None, threads, len(devices), array)


_ADD_SERVER = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_char_p)


def rpc_device(endpoint: str, device: int) -> int:
    """The ggml device `device` of the worker at `endpoint`, as llama.cpp's client sees it (its buffer type
    is named RPC<device>[endpoint]). It connects to the worker and ABORTS the process when that fails:
    probe the worker first (localmix.rpc.probe)."""
    require_rpc()
    g = libggml()
    reg = _rpc_proc("ggml_backend_rpc_add_server", _ADD_SERVER)(endpoint.encode())
    g.ggml_backend_reg_dev_count.argtypes = [ctypes.c_void_p]
    g.ggml_backend_reg_dev_count.restype = ctypes.c_size_t
    count = g.ggml_backend_reg_dev_count(reg) if reg else 0
    if not 0 <= device < count:  # ggml_backend_reg_dev_get would assert
        raise WorkerError(f"worker {endpoint} has {count} device(s); there is no device {device}")
    return g.ggml_backend_reg_dev_get(reg, device)


_ABORT_CALLBACK = ctypes.CFUNCTYPE(None, ctypes.c_char_p)
_fatal_keepalive: list = []  # the callback llama.cpp holds, for the process's life


def on_fatal(report: Callable[[str], None]) -> None:
    """Call `report(message)` with ggml's message when llama.cpp is about to abort the process (a worker
    lost mid-reply, a handshake refused; without ggml's "file:line: " in front): the process still dies,
    but whoever waits for it can say why.
    `report` runs on whichever C thread aborts; it must be quick and must not raise."""

    def called(message: bytes) -> None:
        try:  # ggml puts "source-file:line: " in front of the reason
            report(re.sub(r"^\S+:\d+: ", "", (message or b"").decode(errors="replace")).strip())
        except BaseException:  # noqa: BLE001 - nothing may unwind into C; abort() follows anyway
            pass

    g = libggml()
    g.ggml_set_abort_callback.argtypes = [_ABORT_CALLBACK]
    g.ggml_set_abort_callback.restype = ctypes.c_void_p
    cb = _ABORT_CALLBACK(called)
    _fatal_keepalive.append(cb)
    g.ggml_set_abort_callback(cb)


class _InitParams(ctypes.Structure):
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


GGML_TYPE_F32, GGML_TYPE_Q4_K = 0, 12
LINK_ROW = 4096  # elements per weight row (a hidden size of the models localmix runs)
LINK_ROW_BYTES = LINK_ROW // 256 * 144  # Q4_K: 144 bytes per 256 weights


@cache
def _graph_api():
    g = libggml()
    vp, sz = ctypes.c_void_p, ctypes.c_size_t
    for name, args, res in [
        ("ggml_init", [_InitParams], vp), ("ggml_free", [vp], None), ("ggml_tensor_overhead", [], sz),
        ("ggml_graph_overhead", [], sz), ("ggml_new_tensor_1d", [vp, ctypes.c_int, ctypes.c_int64], vp),
        ("ggml_new_tensor_2d", [vp, ctypes.c_int, ctypes.c_int64, ctypes.c_int64], vp),
        ("ggml_mul_mat", [vp, vp, vp], vp), ("ggml_new_graph", [vp], vp), ("ggml_build_forward_expand", [vp, vp], None),
        ("ggml_backend_dev_init", [vp, ctypes.c_char_p], vp), ("ggml_backend_free", [vp], None),
        ("ggml_backend_alloc_ctx_tensors", [vp, vp], vp), ("ggml_backend_buffer_clear", [vp, ctypes.c_uint8], None),
        ("ggml_backend_buffer_free", [vp], None), ("ggml_backend_graph_compute", [vp, vp], ctypes.c_int),
        ("ggml_backend_tensor_set", [vp, vp, sz, sz], None), ("ggml_backend_tensor_get", [vp, vp, sz, sz], None),
    ]:
        f = getattr(g, name)
        f.argtypes, f.restype = args, res
    return g


def link_probe(endpoint: str, device: int, nbytes: int, repeats: int = 5) -> tuple[float, float]:
    """(hop seconds, bytes/s) of a worker's device through llama.cpp's RPC client: a tiny graph (a
    4096-float activation in, a matrix-vector product there, a row out: what one remote layer costs per
    token beyond its reads) and the same over ~`nbytes` of Q4_K weights; the difference is the time to
    read them there. The weights are zeroed on the worker (ggml_backend_buffer_clear): nothing but the
    graph and the activations crosses the link. Best of `repeats` each. llama.cpp ABORTS the process when
    the worker fails: run this in a child (localmix.rpc.measure_link)."""
    g = _graph_api()
    dev = rpc_device(endpoint, device)
    backend = g.ggml_backend_dev_init(dev, None)
    ctx = g.ggml_init(_InitParams(g.ggml_tensor_overhead() * 8 + 2 * g.ggml_graph_overhead(), None, True))
    rows = max(1, nbytes // LINK_ROW_BYTES)
    x = g.ggml_new_tensor_1d(ctx, GGML_TYPE_F32, LINK_ROW)
    graphs = []
    for n in (1, rows):  # the tiny graph, the big one
        w = g.ggml_new_tensor_2d(ctx, GGML_TYPE_Q4_K, LINK_ROW, n)
        out = g.ggml_mul_mat(ctx, w, x)
        graph = g.ggml_new_graph(ctx)
        g.ggml_build_forward_expand(graph, out)
        graphs.append((graph, out, n))
    buf = g.ggml_backend_alloc_ctx_tensors(ctx, backend)
    g.ggml_backend_buffer_clear(buf, 0)
    inp = (ctypes.c_float * LINK_ROW)(*([0.5] * LINK_ROW))
    result = (ctypes.c_float * rows)()

    def hop(graph, out, n) -> float:
        start = time.perf_counter()
        g.ggml_backend_tensor_set(x, inp, 0, ctypes.sizeof(inp))
        g.ggml_backend_graph_compute(backend, graph)
        g.ggml_backend_tensor_get(out, result, 0, 4 * n)
        return time.perf_counter() - start

    try:
        times = []
        for graph in graphs:
            hop(*graph)  # warm-up: buffers, threads, the graph stored there
            times.append(min(hop(*graph) for _ in range(repeats)))
    finally:
        g.ggml_backend_buffer_free(buf)
        g.ggml_free(ctx)
        g.ggml_backend_free(backend)
    tiny, big = times
    return tiny, rows * LINK_ROW_BYTES / max(big - tiny, 1e-9)


# -- loading ----------------------------------------------------------------------------------------------


class _BuftOverride(ctypes.Structure):
    _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]


@contextmanager
def _model_params(overrides, progress_cb, devices=None, repack: bool = True):
    """Make llama-cpp-python start from default model params that already carry our tensor overrides,
    progress callback, (a NULL-terminated array) devices and repacking choice: its Llama() sets none of them."""
    import llama_cpp.llama_cpp as C

    original = C.llama_model_default_params

    def with_overrides():
        p = original()
        if overrides is not None:
            p.tensor_buft_overrides = ctypes.cast(overrides, ctypes.c_void_p)
        if progress_cb is not None:
            p.progress_callback = progress_cb
        if devices is not None:
            p.devices = ctypes.cast(devices, ctypes.c_void_p)
        if not repack:
            p.use_extra_bufts = False  # llama.cpp's --no-repack
        return p

    with _params_lock:
        C.llama_model_default_params = with_overrides
        try:
            yield
        finally:
            C.llama_model_default_params = original


GGML_LOG_LEVEL_ERROR, GGML_LOG_LEVEL_CONT = 4, 5


@contextmanager
def _captured_log(lines: list[str], echo: bool, errors: list[str] | None = None):
    """llama.cpp's log (all levels) into `lines` while the block runs, its error messages also into
    `errors`; echoed to stderr when asked."""
    import llama_cpp
    from llama_cpp import _logger

    last_level = [0]

    def on_log(level, text, _user):
        line = text.decode(errors="replace")
        lines.append(line)
        cont = level == GGML_LOG_LEVEL_CONT
        level = last_level[0] if cont else level
        last_level[0] = level
        if errors is not None and level == GGML_LOG_LEVEL_ERROR:  # one entry per message, continuations joined
            if cont and errors:
                errors[-1] += line
            else:
                errors.append(line)
        if echo:
            print(line, end="", file=sys.stderr, flush=True)

    cb = llama_cpp.llama_log_callback(on_log)
    llama_cpp.llama_log_set(cb, ctypes.c_void_p(0))
    try:
        yield
    finally:
        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))


@contextmanager
def _no_chat_formatter():
    """Llama() compiles the GGUF's chat template for llama-cpp-python's own chat API, which localmix does
    not use, in a Jinja environment without limits: a template that does not compile raised there, and
    one that folds `9**(9**9)` as a constant hung there. localmix renders templates itself, under limits
    (localmix.prompt.template), so Llama() is given a formatter that compiles nothing."""
    from llama_cpp import llama_chat_format

    class Unused:
        def __init__(self, *args, **kwargs):
            pass

        def to_chat_handler(self):
            return None

    original = llama_chat_format.Jinja2ChatFormatter
    llama_chat_format.Jinja2ChatFormatter = Unused
    try:
        yield
    finally:
        llama_chat_format.Jinja2ChatFormatter = original


# llama.cpp's closing lines, which say only that the load failed: the reason is in an earlier one.
_GENERIC = ("failed to load model", "failed to read tensor data", "failed to load vocabulary")


def load_error(path: str | Path, errors: list[str], exc: Exception) -> ModelFileError:
    """One line for a file llama.cpp refused: its own last error message that says why ("error loading
    model: ..." with the function names cut; text from the file in it shown escaped), else what
    llama-cpp-python raised."""
    messages = [x.strip() for x in errors if x.strip()]
    why = [x for x in messages if not any(g in x.lower() for g in _GENERIC)]
    reason = why[-1] if why else str(exc)
    reason = reason.split("error loading model: ", 1)[-1]
    while len(m := reason.split(": ", 1)) == 2 and m[0].isidentifier() and "_" in m[0]:  # "check_tensor_dims: x"
        reason = m[1]
    return ModelFileError(f"llama.cpp could not load {shown(path, 500)}: {shown(' '.join(reason.split()), 300)}")


@dataclass(frozen=True)
class Perf:
    """llama.cpp's own counters since the last reset."""

    prompt_tokens: int
    prompt_seconds: float
    gen_tokens: int
    gen_seconds: float


def _c_strlen() -> int:
    """The address of C's strlen: as an abort callback (bool (*)(void *)) on a 2-byte buffer it returns 0
    or 1, the flag in the buffer, in the register where every ABI llama.cpp runs on returns a bool."""
    libc = ctypes.cdll.msvcrt if sys.platform == "win32" else ctypes.CDLL(None)
    return ctypes.cast(libc.strlen, ctypes.c_void_p).value


def _devices_with(remote: list[int]):
    """Model `devices` and `tensor_split` for a load that uses workers' devices: this machine's GPUs, then
    the workers'. llama.cpp counts a worker's device as a GPU and would spread layers over it too; a split
    of 1 per local GPU and 0 per worker device keeps the layers here, so that only the tensor overrides
    put anything there. (None, None) without workers: llama.cpp's own defaults."""
    if not remote:
        return None, None
    local = local_gpus()
    devices = (ctypes.c_void_p * (len(local) + len(remote) + 1))(*local, *remote, None)
    return devices, [1.0] * len(local) + [0.0] * len(remote) if local else None


class Engine:
    """A model loaded by llama.cpp, with its context: tokenize, evaluate, sample."""

    def __init__(self, llm, keepalive=(), log: list[str] | None = None):
        self.llm = llm
        self._keepalive = keepalive  # ctypes arrays and callbacks llama.cpp holds pointers to
        self.log = log or []  # llama.cpp's log lines while loading (tensor overrides are listed there)
        # The abort flag llama.cpp reads between the steps of a decode (a long prompt stops within one):
        # "" or "1" in a C buffer, read by C's strlen, so that no Python runs inside the decode (a Python
        # callback there would take the GIL at every step, and a Ctrl-C raised inside it would be lost).
        self._abort_flag = ctypes.create_string_buffer(2)
        if getattr(llm, "_ctx", None) is not None:  # a vocabulary alone has no context to abort
            import llama_cpp

            self._abort_cb = llama_cpp.ggml_abort_callback(_c_strlen())
            llama_cpp.llama_set_abort_callback(llm._ctx.ctx, self._abort_cb, ctypes.cast(self._abort_flag, ctypes.c_void_p))

    def set_threads(self, decode: int, batch: int) -> None:
        """Threads for one-token steps and for prompt batches, from the next evaluation on."""
        import llama_cpp

        llama_cpp.llama_set_n_threads(self.llm._ctx.ctx, decode, batch)

    @property
    def threads(self) -> tuple[int, int]:
        """(decode, batch) threads llama.cpp's context uses now."""
        import llama_cpp

        ctx = self.llm._ctx.ctx
        return llama_cpp.llama_n_threads(ctx), llama_cpp.llama_n_threads_batch(ctx)

    @property
    def _aborting(self) -> bool:
        return self._abort_flag.value != b""

    @_aborting.setter
    def _aborting(self, on: bool) -> None:
        self._abort_flag.value = b"1" if on else b""

    def abort(self) -> None:
        """Stop the evaluation under way (from any thread): sample() then ends as if the caller stopped."""
        self._aborting = True

    @classmethod
    def load(cls, path: str | Path, *, n_gpu_layers: int, cpu_patterns: list[str], ctx: int, threads: int | None,
             flash_attn: bool, kv_type: str = "f16", batch: int = 512, ubatch: int | None = None,
             rpc_patterns: dict[tuple[str, int], list[str]] | None = None, repack: bool = True,
             progress: Callable[[float], None] | None = None, verbose: bool = False) -> Engine:
        """Load with every layer up to n_gpu_layers offloaded and the tensors matching `cpu_patterns`
        (std::regex_search) pinned to host memory, as `-ngl N -ot PATTERN=CPU` do; those matching
        `rpc_patterns[(endpoint, device)]` go to that device of that worker (`--rpc E -ot PATTERN=RPC<d>[E]`),
        the workers having been probed (llama.cpp aborts on one that does not answer). `repack` False: the
        CPU's weights stay as stored (llama.cpp's --no-repack), as a worker keeps them; with it the CPU
        repacks some types for faster kernels, whose sums differ in the last bits. ValueError or
        ModelFileError, with llama.cpp's own reason, when it refuses the file. `batch` is n_batch (tokens
        per llama_decode call), `ubatch` n_ubatch (tokens per graph evaluation; None: `batch`)."""
        import llama_cpp

        rpc_patterns = {k: v for k, v in (rpc_patterns or {}).items() if v}
        remote = {key: rpc_device(*key) for key in rpc_patterns}
        pairs = [(p, cpu_buffer_type()) for p in cpu_patterns]
        pairs += [(p, libggml().ggml_backend_dev_buffer_type(remote[key])) for key, ps in rpc_patterns.items() for p in ps]
        keep = [p.encode() for p, _ in pairs]  # the C strings must outlive the load
        overrides = None
        if pairs:
            overrides = (_BuftOverride * (len(pairs) + 1))()
            for i, (p, (_, buft)) in enumerate(zip(keep, pairs)):
                overrides[i].pattern, overrides[i].buft = p, buft
            overrides[len(pairs)].pattern, overrides[len(pairs)].buft = None, None
        devices, split = _devices_with(list(remote.values()))

        def on_progress(fraction: float, _user) -> bool:
            if progress:
                progress(float(fraction))
            return True

        progress_cb = llama_cpp.llama_progress_callback(on_progress)
        log: list[str] = []
        errors: list[str] = []
        with _model_params(overrides, progress_cb, devices, repack), _captured_log(log, verbose, errors), _no_chat_formatter():
            try:
                llm = llama_cpp.Llama(
                    str(path), n_gpu_layers=n_gpu_layers, n_ctx=ctx, n_batch=batch, n_ubatch=min(ubatch or batch, batch),
                    n_threads=threads, n_threads_batch=threads, flash_attn=flash_attn,
                    type_k=KV_TYPES[kv_type], type_v=KV_TYPES[kv_type], verbose=verbose, tensor_split=split,
                )
            except (ValueError, RuntimeError) as e:  # llama-cpp-python's way of saying the load failed
                raise load_error(path, errors, e) from None
        return cls(llm, (overrides, keep, progress_cb, devices), log)

    @classmethod
    def vocab_only(cls, path: str | Path) -> Engine:
        """The vocabulary alone (no weights read): for tokenizing without loading the model."""
        import llama_cpp

        log: list[str] = []
        errors: list[str] = []
        with _captured_log(log, False, errors), _no_chat_formatter():
            try:
                return cls(llama_cpp.Llama(str(path), vocab_only=True, verbose=False), (), log)
            except (ValueError, RuntimeError) as e:
                raise load_error(path, errors, e) from None

    # -- vocabulary ---------------------------------------------------------------------------------------

    def tokenize(self, text: str, *, special: bool) -> list[int]:
        """No BOS is added; `special`: control tokens written as text become their ids. (Not Llama.tokenize,
        which allocates a buffer of the model's whole trained context for every call: gigabytes for a
        file that claims a context of 2^31.)"""
        import llama_cpp

        data = text.encode()
        size = len(data) + 8
        while True:
            buf = (llama_cpp.llama_token * size)()
            n = llama_cpp.llama_tokenize(self.llm._model.vocab, data, len(data), buf, size, False, special)
            if n >= 0:
                return buf[:n]
            size = -n  # llama.cpp returns the size it needs, negated

    def piece(self, token: int, special: bool = False) -> bytes:
        """The bytes of one token (`special`: control tokens as their text, else as nothing)."""
        import llama_cpp

        size = 64
        while True:
            buf = ctypes.create_string_buffer(size)
            n = llama_cpp.llama_token_to_piece(self.llm._model.vocab, token, buf, size, 0, special)
            if n >= 0:
                return buf.raw[:n]
            size = -n  # llama.cpp returns the size it needs, negated

    @property
    def bos(self) -> int:
        return self.llm.token_bos()

    @property
    def adds_bos(self) -> bool:
        """The vocabulary puts BOS in front of a text (llama.cpp's add_bos: metadata, or the tokenizer's default)."""
        import llama_cpp

        return bool(llama_cpp.llama_vocab_get_add_bos(self.llm._model.vocab))

    @property
    def eos(self) -> int:
        return self.llm.token_eos()

    def is_end(self, token: int) -> bool:
        """End of generation (EOS, EOT, and the like)."""
        import llama_cpp

        return bool(llama_cpp.llama_vocab_is_eog(self.llm._model.vocab, token))

    # -- evaluation ---------------------------------------------------------------------------------------

    @property
    def n_tokens(self) -> int:
        """Tokens in the KV cache."""
        return self.llm.n_tokens

    def cached_prefix(self, tokens: list[int]) -> int:
        """How many leading `tokens` the KV cache already holds."""
        n = 0
        for a, b in zip(self.llm._input_ids[: self.llm.n_tokens], tokens):
            if a != b:
                break
            n += 1
        return n

    def accepts_grammar(self, grammar: str) -> bool:
        """llama.cpp parses the GBNF (an unparsable one would reach its sampler chain as NULL and crash)."""
        import llama_cpp

        sampler = llama_cpp.llama_sampler_init_grammar(self.llm._model.vocab, grammar.encode(), b"root")
        if not sampler:
            return False
        llama_cpp.llama_sampler_free(sampler)
        return True

    def sample(self, tokens: list[int], *, temperature: float, top_p: float, seed: int | None,
               grammar: str | None = None, frequency_penalty: float = 0.0, presence_penalty: float = 0.0) -> Iterator[int]:
        """Tokens sampled after `tokens` (the cached prefix is reused), one at a time, until the caller
        stops; `grammar` (GBNF) constrains them."""
        from llama_cpp import LlamaGrammar

        self._aborting = False
        if seed is not None:
            self.llm.set_seed(seed)
        compiled = LlamaGrammar.from_string(grammar, verbose=False) if grammar else None
        gen = self.llm.generate(tokens, temp=temperature, top_p=top_p, top_k=40, min_p=0.05, repeat_penalty=1.0,
                                frequency_penalty=frequency_penalty, presence_penalty=presence_penalty, grammar=compiled)
        errors: list[str] = []
        # llama.cpp logs an aborted decode as an error; on a terminal (the chat app) that line would land
        # on the screen. Its errors are kept here and shown only when they were not an abort.
        with _captured_log([], echo=False, errors=errors):
            try:
                yield from gen
            except RuntimeError:  # llama_decode returned 2: aborted; llm.eval drops the partial batch next time
                if not self._aborting:
                    raise
                import llama_cpp

                llama_cpp.llama_synchronize(self.llm._ctx.ctx)  # the aborted work's counts land now, not in the next reply's
            finally:
                gen.close()
                if errors and not self._aborting:
                    print("".join(errors), end="", file=sys.stderr, flush=True)

    def evaluate(self, tokens: list[int]) -> None:
        """Run tokens through the model (no sampling) and wait for the result, as sampling would."""
        import llama_cpp

        self._aborting = False
        self.llm.eval(tokens)
        llama_cpp.llama_synchronize(self.llm._ctx.ctx)  # the perf counters are updated when work is waited for

    def forget(self) -> None:
        """Empty the KV cache."""
        self.llm.reset()

    def logits_after(self, tokens: list[int], first: int):
        """One sequence evaluated from an empty KV cache in batches of n_batch, as llama-perplexity does:
        logits (float32 [len(tokens) - first, n_vocab]) of positions `first` onwards only, so the output
        layer runs for those alone."""
        import llama_cpp
        import numpy as np

        llm = self.llm
        self._aborting = False
        llm._ctx.kv_cache_clear()
        llm.reset()
        n_vocab, batch, out = llm.n_vocab(), llm._batch.batch, []
        for start in range(0, len(tokens), llm.n_batch):
            part = tokens[start:start + llm.n_batch]
            batch.n_tokens = len(part)
            for k, tok in enumerate(part):
                batch.token[k], batch.pos[k], batch.n_seq_id[k] = tok, start + k, 1
                batch.seq_id[k][0] = 0
                batch.logits[k] = start + k >= first
            rc = llama_cpp.llama_decode(llm._ctx.ctx, batch)
            if rc != 0:
                raise ModelFileError(f"llama.cpp could not evaluate a batch (llama_decode returned {rc})")
            n_out = max(0, start + len(part) - max(first, start))
            if n_out:
                out.append(np.ctypeslib.as_array(llama_cpp.llama_get_logits(llm._ctx.ctx), shape=(n_out * n_vocab,))
                           .reshape(n_out, n_vocab).copy())
        llm._ctx.kv_cache_clear()
        return np.concatenate(out) if out else np.zeros((0, n_vocab), np.float32)

    def reset_perf(self) -> None:
        import llama_cpp

        llama_cpp.llama_perf_context_reset(self.llm._ctx.ctx)

    def perf(self) -> Perf:
        import llama_cpp

        p = llama_cpp.llama_perf_context(self.llm._ctx.ctx)
        return Perf(p.n_p_eval, p.t_p_eval_ms / 1000, p.n_eval, p.t_eval_ms / 1000)

    def close(self) -> None:
        if self.llm is not None:
            self.llm.close()
            self.llm = None
