"""Hardware discovery without torch, and the bandwidth probes: the best of several, kept per machine,
measured again on request."""

import json
import os
import time
from pathlib import Path

import pytest

from localmix import hardware


def cache() -> Path:
    return Path(os.environ["LOCALMIX_HOME"]) / "cache" / "hardware.json"


def test_detect_probes_several_times_and_keeps_the_best():
    hw = hardware.detect()
    assert hw.cores >= 1 and hw.ram_total >= hw.ram_available > 0
    assert all(g.total >= g.free > 0 for g in hw.gpus)  # none on the CPU build
    saved = json.loads(cache().read_text())
    [samples] = [m["samples"] for m in saved["machines"].values()]
    assert len(samples) == hardware.FIRST_PROBES == hw.probes
    assert hw.read_bandwidth == max(s["read_bandwidth"] for s in samples) > 1e9  # any machine reads RAM faster than 1 GB/s
    assert time.time() - hw.measured < 60


def test_a_busy_moment_does_not_poison_later_predictions():
    """One low probe from an hour ago: the next run adds a probe, and the best wins."""
    hw = hardware.detect(probe=False)
    key = hardware.machine_key(hw)
    cache().parent.mkdir(parents=True, exist_ok=True)
    cache().write_text(json.dumps({"version": hardware.CACHE_VERSION, "machines": {
        key: {"samples": [{"read_bandwidth": 1e6, "at": time.time() - 2 * hardware.PROBE_INTERVAL}]}}}))
    hw = hardware.detect()
    assert hw.probes == 2 and hw.read_bandwidth > 1e9
    # within the hour: the cache is used as it is
    again = hardware.detect()
    assert again.probes == 2 and again.read_bandwidth == hw.read_bandwidth


def test_another_machine_and_measure_again():
    hardware.detect()
    data = json.loads(cache().read_text())
    data["machines"]["another host|same CPU|2 cores|24 GiB"] = {"samples": [{"read_bandwidth": 5e12, "at": time.time()}]}
    cache().write_text(json.dumps(data))
    assert hardware.detect().read_bandwidth < 5e12  # not this machine's probes
    fresh = hardware.detect(measure=True)
    assert fresh.probes == hardware.FIRST_PROBES and time.time() - fresh.measured < 60


def test_a_damaged_cache_is_measured_again():
    cache().parent.mkdir(parents=True, exist_ok=True)
    cache().write_text("{not json")
    assert hardware.detect().probes == hardware.FIRST_PROBES


def test_decode_bandwidth_is_bounded_by_cores():
    few = hardware.Hardware(cores=2, read_bandwidth=200e9)
    assert few.cpu_decode_bandwidth == 2 * hardware.CORE_DECODE_RATE
    many = hardware.Hardware(cores=64, read_bandwidth=60e9)
    assert many.cpu_decode_bandwidth == pytest.approx(60e9 * hardware.DECODE_READ_EFFICIENCY)


def test_cores_and_ram_from_psutil():
    import psutil

    assert hardware.memory()[0] == psutil.virtual_memory().total
    assert 1 <= hardware.physical_cores() <= len(os.sched_getaffinity(0))


def test_gpu_bandwidth_table():
    assert hardware.gpu_bandwidth("NVIDIA GeForce RTX 4090") == 1.008e12
    assert hardware.gpu_bandwidth("NVIDIA H100 PCIe") == 2.0e12
    assert hardware.gpu_bandwidth("NVIDIA H100 80GB HBM3") == 3.35e12
    assert hardware.gpu_bandwidth("Some Future GPU") == hardware.DEFAULT_GPU_BANDWIDTH
