"""This machine, without torch: GPUs and their free memory from llama.cpp's own device list, RAM and
physical cores from psutil, CPU memory bandwidth from short probes kept in the user's cache folder.
Everything the planner reads can be overridden (--vram, --ram) to plan for another machine.

The bandwidth is the best of several probes taken at different times: one probe during a busy moment
reads low, and the best of several is close to what the memory can do. Probes are kept per machine
(host name, CPU, cores, RAM), so another machine behind the same CPU name gets its own; `--measure`
throws them away and measures again."""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import llamacpp
from .paths import cache_dir
from .units import GiB

# Memory bandwidth of known GPUs, bytes/s (vendor specifications), by a substring of the name llama.cpp
# reports. First match wins, so more specific names come first.
GPU_BANDWIDTH = [
    ("H200", 4.8e12), ("H100 PCIe", 2.0e12), ("H100", 3.35e12), ("A100", 2.0e12), ("L40S", 0.864e12),
    ("L4", 0.3e12), ("RTX 5090", 1.79e12), ("RTX 5080", 0.96e12), ("RTX 4090", 1.008e12), ("RTX 4080", 0.717e12),
    ("RTX 4070 Ti", 0.504e12), ("RTX 4070", 0.504e12), ("RTX 4060 Ti", 0.288e12), ("RTX 3090", 0.936e12),
    ("RTX 3080", 0.76e12), ("RTX 3070", 0.448e12), ("RTX 3060", 0.36e12), ("A6000", 0.768e12), ("7900 XTX", 0.96e12),
]
DEFAULT_GPU_BANDWIDTH = 0.5e12
PCIE_BANDWIDTH = 24e9  # PCIe 4.0 x16, as seen by a host-to-device copy
# llama.cpp's decode streams weights at a little under what a plain multi-threaded read reaches (fitted
# with `localmix bench` on the project's machine: 36-41 GB/s against a 40 GB/s probe).
DECODE_READ_EFFICIENCY = 0.9
# What one core's quantized matrix-vector kernels get through (bytes of weights per second) and its
# prefill arithmetic rate: with few cores decode is bound by these rather than by memory. Fitted with
# `localmix bench` on the project's 2-core EPYC machine (41 GB/s and ~105 GFLOP/s on 2 cores, from
# cache: that CPU's L3 holds the test models' active weights).
CORE_DECODE_RATE = 20e9
CORE_FLOPS = 50e9

# Probes: the first run takes FIRST_PROBES (a fraction of a second each); later runs add one more, at
# most one an hour, until MAX_PROBES are kept; the estimate is the best of them.
FIRST_PROBES, MAX_PROBES, PROBE_INTERVAL = 3, 6, 3600.0
CACHE_VERSION = 2


@dataclass
class Gpu:
    name: str
    free: int
    total: int
    bandwidth: float


@dataclass
class Hardware:
    gpus: list[Gpu] = field(default_factory=list)
    ram_total: int = 0
    ram_available: int = 0
    cores: int = 1  # physical, that this process may use
    read_bandwidth: float = 0.0  # bytes/s a multi-threaded read of RAM reaches: the best probe
    probes: int = 0  # how many probes that is the best of
    measured: float = 0.0  # when the latest probe ran (Unix time)
    cpu_name: str = ""

    @property
    def cpu_decode_bandwidth(self) -> float:
        """Bytes of weights per second llama.cpp's decode reads from RAM: memory-bound with many cores,
        compute-bound with few."""
        return min(self.read_bandwidth * DECODE_READ_EFFICIENCY, self.cores * CORE_DECODE_RATE)

    @property
    def cpu_flops(self) -> float:
        return self.cores * CORE_FLOPS


def gpu_bandwidth(name: str) -> float:
    return next((bw for key, bw in GPU_BANDWIDTH if key.lower() in name.lower()), DEFAULT_GPU_BANDWIDTH)


def detect_gpus() -> list[Gpu]:
    return [Gpu(name, free, total, gpu_bandwidth(name)) for name, free, total in llamacpp.gpu_devices()]


def memory() -> tuple[int, int]:
    """(total, available) RAM in bytes."""
    import psutil

    vm = psutil.virtual_memory()
    return vm.total, vm.available


def physical_cores() -> int:
    """Physical cores, no more than the CPUs this process may run on (containers, taskset)."""
    import psutil

    physical = psutil.cpu_count(logical=False) or psutil.cpu_count() or 1
    try:
        usable = len(psutil.Process().cpu_affinity())
    except (AttributeError, OSError):  # macOS has no affinity
        usable = os.cpu_count() or physical
    return max(1, min(physical, usable))


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def probe_read_bandwidth(threads: int, mib: int = 512, passes: int = 5) -> float:
    """Bytes per second a multi-threaded read of a buffer bigger than any CPU cache reaches (numpy's
    SIMD max over bytes, which does next to no arithmetic per byte): the rate decode's weight streaming
    scales with. The best of `passes` passes."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    buf = np.ones(mib << 20, dtype=np.uint8)
    parts = np.array_split(buf, threads)
    best = 0.0
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(passes):
            t0 = time.perf_counter()
            list(pool.map(np.max, parts))
            best = max(best, buf.nbytes / (time.perf_counter() - t0))
    return best


def cache_file() -> Path:
    return cache_dir() / "hardware.json"


def _load_cache() -> dict:
    try:
        data = json.loads(cache_file().read_text())
        if data.get("version") == CACHE_VERSION and isinstance(data.get("machines"), dict):
            return data
    except (OSError, ValueError, AttributeError):
        pass
    return {"version": CACHE_VERSION, "machines": {}}


def _save_cache(data: dict) -> None:
    path = cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, path)
    except OSError:  # a read-only cache folder costs a probe next time, nothing more
        pass


def machine_key(hw: Hardware) -> str:
    return f"{platform.node()}|{hw.cpu_name}|{hw.cores} cores|{round(hw.ram_total / GiB)} GiB"


def detect(probe: bool = True, measure: bool = False) -> Hardware:
    """This machine. `probe`: run bandwidth probes when the cache asks for them (False: use only what is
    cached); `measure`: forget the cached probes and measure again."""
    total, available = memory()
    hw = Hardware(gpus=detect_gpus(), ram_total=total, ram_available=available, cores=physical_cores(), cpu_name=cpu_name())
    data = _load_cache()
    key = machine_key(hw)
    samples = [] if measure else [s for s in data["machines"].get(key, {}).get("samples", [])
                                  if isinstance(s, dict) and isinstance(s.get("read_bandwidth"), (int, float))]
    newest = max((s.get("at", 0) for s in samples), default=0)
    wanted = FIRST_PROBES if not samples else int(len(samples) < MAX_PROBES and time.time() - newest > PROBE_INTERVAL)
    if probe and wanted:
        for i in range(wanted):
            if i:
                time.sleep(0.2)  # a little apart, so that one burst of load does not hit them all
            samples.append({"read_bandwidth": probe_read_bandwidth(hw.cores), "at": time.time()})
        data["machines"][key] = {"samples": samples[-MAX_PROBES:]}
        _save_cache(data)
    if samples:
        hw.read_bandwidth = max(s["read_bandwidth"] for s in samples)
        hw.probes = len(samples)
        hw.measured = max(s.get("at", 0) for s in samples)
    return hw


# -- threads under load -------------------------------------------------------------------------------------
# llama.cpp's threads meet at a barrier after every op, so a step runs at the pace of its slowest thread:
# one thread sharing a core with another program more than halves decode (measured on the project's 2-core
# machine: 42.8 tok/s idle with 2 threads, 16-18 with one core busy, 30.9 with 1 thread). So a core is
# counted as taken when another program keeps it more than BUSY_CORE busy: between those measurements 2
# threads lose about 26 tok/s per busy core and 1 thread gives 31, so the break-even is near 0.45 of a
# core; a core at 30% (a terminal, a browser tab now and then) still gives its thread most of each step,
# one at 80-100% does not. A clean sweep of partly busy cores needs a quiet machine: --parts duty of
# benchmarks/runtime_tuning.py.
BUSY_CORE = 0.5
# Load is measured over at least this long: a shorter window is a few scheduler ticks of noise.
MIN_WINDOW = 0.2


@dataclass(frozen=True)
class Threads:
    decode: int  # threads for one-token steps
    batch: int  # threads for prompt batches
    physical: int  # physical cores
    busy: float  # cores' worth of CPU other processes used when sampled
    given: bool = False  # --threads said so

    def describe(self) -> str:
        n = f"{self.decode} thread{'s' if self.decode != 1 else ''}"
        if self.batch != self.decode:
            n += f" ({self.batch} for prompts)"
        if self.given:
            return f"{n} (--threads)"
        load = f"{self.busy:.1f} busy with other programs" if self.busy >= BUSY_CORE else f"{self.busy:.1f} busy"
        return f"{n} ({self.physical} cores, {load})"


def taken_cores(busy: float) -> int:
    """Whole cores other programs take: `busy` cores' worth, a core counting once it is over BUSY_CORE busy."""
    whole = int(busy)
    return whole + (busy - whole > BUSY_CORE)


def choose_threads(physical: int, busy: float) -> Threads:
    """The rule: one thread per core that other programs leave free, never more than the physical cores,
    at least one. Prompt batches use the same count (benchmarks/runtime_tuning.py: with one of two cores
    busy, prefill with 2 threads is no faster than with 1)."""
    n = max(1, min(physical, physical - taken_cores(max(0.0, busy))))
    return Threads(decode=n, batch=n, physical=physical, busy=max(0.0, busy))


@dataclass(frozen=True)
class _Sample:
    at: float  # time.monotonic()
    system_busy: float  # CPU seconds all processes used (every CPU together), from /proc/stat or the OS
    own: float  # CPU seconds this process used


def _sample() -> _Sample:
    import psutil

    t = psutil.cpu_times()
    busy = sum(t) - t.idle - getattr(t, "iowait", 0.0) - getattr(t, "guest", 0.0) - getattr(t, "guest_nice", 0.0)
    own = psutil.Process().cpu_times()
    return _Sample(time.monotonic(), busy, own.user + own.system)


_last: dict = {}  # "sample": the previous sample, "load": what it measured; a reply waits for no probe


def other_load(min_window: float = MIN_WINDOW) -> float:
    """Cores' worth of CPU other processes used since the previous call (this process's own threads
    excluded: llama.cpp's threads spinning between steps are not load). Only the first call waits (for
    `min_window`); a call within `min_window` of the previous one answers what that one measured, later
    ones cost a few reads of /proc. Guest time is already counted in user time, so it is taken out."""
    start = _last.get("sample")
    if start is None:
        start = _sample()
        time.sleep(min_window)
    elif time.monotonic() - start.at < min_window:
        return _last["load"]
    now = _sample()
    load = max(0.0, (now.system_busy - start.system_busy - (now.own - start.own)) / (now.at - start.at))
    _last.update(sample=now, load=load)
    return load


def auto_threads(given: int | None = None) -> Threads:
    """Threads for the next reply: `given` (--threads) as is, else chosen from the cores other programs
    leave free now."""
    physical = physical_cores()
    if given:
        return Threads(decode=given, batch=given, physical=physical, busy=0.0, given=True)
    return choose_threads(physical, other_load())
