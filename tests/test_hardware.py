"""Hardware discovery without torch, the cached bandwidth probe, and size flags."""

import argparse
import json
import os
from pathlib import Path

import pytest

from localmix import hardware
from localmix.commands.common import parse_size


def test_detect_and_cache_the_probe():
    hw = hardware.detect()
    assert hw.cores >= 1 and hw.ram_total >= hw.ram_available > 0
    assert hw.read_bandwidth > 1e9  # any machine reads RAM faster than 1 GB/s
    assert all(g.total >= g.free > 0 for g in hw.gpus)  # none on the CPU build
    cache = Path(os.environ["LOCALMIX_HOME"]) / "cache" / "hardware.json"
    saved = json.loads(cache.read_text())
    assert saved["read_bandwidth"] == hw.read_bandwidth
    # the next run reads the cache instead of probing again
    saved["read_bandwidth"] = 12.5e9
    cache.write_text(json.dumps(saved))
    assert hardware.detect().read_bandwidth == 12.5e9


def test_decode_bandwidth_is_bounded_by_cores():
    few = hardware.Hardware(cores=2, read_bandwidth=200e9)
    assert few.cpu_decode_bandwidth == 2 * hardware.CORE_DECODE_RATE
    many = hardware.Hardware(cores=64, read_bandwidth=60e9)
    assert many.cpu_decode_bandwidth == pytest.approx(60e9 * hardware.DECODE_READ_EFFICIENCY)


def test_gpu_bandwidth_table():
    assert hardware.gpu_bandwidth("NVIDIA GeForce RTX 4090") == 1.008e12
    assert hardware.gpu_bandwidth("NVIDIA H100 PCIe") == 2.0e12
    assert hardware.gpu_bandwidth("NVIDIA H100 80GB HBM3") == 3.35e12
    assert hardware.gpu_bandwidth("Some Future GPU") == hardware.DEFAULT_GPU_BANDWIDTH


def test_sizes():
    assert parse_size("24G") == parse_size("24GiB") == parse_size("24") == 24 << 30
    assert parse_size("512M") == 512 << 20 and parse_size("0") == 0 and parse_size("1.5g") == 3 << 29
    with pytest.raises(argparse.ArgumentTypeError):
        parse_size("lots")
