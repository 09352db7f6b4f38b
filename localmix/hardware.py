"""This machine, without torch: GPUs and their free memory from llama.cpp's own device list (libggml),
RAM and physical cores from the OS, CPU memory bandwidth from a short probe cached in the user's cache
folder. Everything the planner reads can be overridden (--vram, --ram) to plan for another machine."""

from __future__ import annotations

import ctypes
import json
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

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

GGML_DEVICE_TYPE_CPU, GGML_DEVICE_TYPE_GPU, GGML_DEVICE_TYPE_IGPU = 0, 1, 2


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
    cores: int = 1  # physical
    read_bandwidth: float = 0.0  # bytes/s a multi-threaded read of RAM reaches
    cpu_name: str = ""

    @property
    def cpu_decode_bandwidth(self) -> float:
        """Bytes of weights per second llama.cpp's decode reads from RAM: memory-bound with many cores,
        compute-bound with few."""
        return min(self.read_bandwidth * DECODE_READ_EFFICIENCY, self.cores * CORE_DECODE_RATE)

    @property
    def cpu_flops(self) -> float:
        return self.cores * CORE_FLOPS


def _libggml():
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


def gpu_bandwidth(name: str) -> float:
    return next((bw for key, bw in GPU_BANDWIDTH if key.lower() in name.lower()), DEFAULT_GPU_BANDWIDTH)


def detect_gpus() -> list[Gpu]:
    g = _libggml()
    gpus = []
    for i in range(g.ggml_backend_dev_count()):
        dev = g.ggml_backend_dev_get(i)
        if g.ggml_backend_dev_type(dev) not in (GGML_DEVICE_TYPE_GPU, GGML_DEVICE_TYPE_IGPU):
            continue
        free, total = ctypes.c_size_t(), ctypes.c_size_t()
        g.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
        name = (g.ggml_backend_dev_description(dev) or g.ggml_backend_dev_name(dev) or b"GPU").decode(errors="replace")
        gpus.append(Gpu(name, free.value, total.value, gpu_bandwidth(name)))
    return gpus


def cpu_buffer_type() -> int:
    """llama.cpp's host-memory buffer type, the value a `tensor_buft_overrides` entry names for "CPU"."""
    g = _libggml()
    return g.ggml_backend_dev_buffer_type(g.ggml_backend_dev_by_type(GGML_DEVICE_TYPE_CPU))


def memory() -> tuple[int, int]:
    """(total, available) RAM in bytes."""
    try:
        info = {}
        with open("/proc/meminfo") as f:
            for line in f:
                key, value = line.split(":", 1)
                info[key] = int(value.split()[0]) * 1024
        return info["MemTotal"], info.get("MemAvailable", info["MemFree"])
    except (OSError, KeyError, ValueError):
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return total, total // 2


def physical_cores() -> int:
    try:
        pairs = set()
        phys = core = None
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("physical id"):
                    phys = line.split(":")[1].strip()
                elif line.startswith("core id"):
                    core = line.split(":")[1].strip()
                    pairs.add((phys, core))
        usable = len(os.sched_getaffinity(0))
        return max(1, min(len(pairs) or usable, usable))
    except OSError:
        return max(1, (os.cpu_count() or 2) // 2)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def probe_read_bandwidth(threads: int, mib: int = 1024, repeats: int = 5) -> float:
    """Bytes per second a multi-threaded read of a 1 GiB buffer reaches (numpy's SIMD max over bytes,
    which does next to no arithmetic per byte): the rate decode's weight streaming scales with."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    buf = np.ones(mib << 20, dtype=np.uint8)
    parts = np.array_split(buf, threads)
    best = 0.0
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(repeats):
            t0 = time.perf_counter()
            list(pool.map(np.max, parts))
            best = max(best, buf.nbytes / (time.perf_counter() - t0))
    return best


def _cache_file() -> Path:
    from .paths import cache_dir

    return cache_dir() / "hardware.json"


def detect(probe: bool = True) -> Hardware:
    """This machine. The bandwidth probe (about a second) runs once and is cached per CPU model and core count
    (delete ~/.cache/localmix/hardware.json to measure again)."""
    total, available = memory()
    hw = Hardware(gpus=detect_gpus(), ram_total=total, ram_available=available, cores=physical_cores(), cpu_name=cpu_name())
    key = f"read-v1|{hw.cpu_name}|{hw.cores}"
    cache = _cache_file()
    try:
        cached = json.loads(cache.read_text())
        if cached.get("key") == key:
            hw.read_bandwidth = float(cached["read_bandwidth"])
    except (OSError, ValueError, KeyError):
        pass
    if not hw.read_bandwidth and probe:
        hw.read_bandwidth = probe_read_bandwidth(hw.cores)
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.write_text(json.dumps({"key": key, "read_bandwidth": hw.read_bandwidth}))
        except OSError:
            pass
    return hw
