"""Sizes and durations: parsed from what users type, formatted for what they read. Binary units
throughout, as GPU vendors and `free -g` count; a bare number is GiB. Bandwidths are decimal (GB/s), as
memory vendors quote them."""

from __future__ import annotations

import re

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40

DEFAULT_CTX = 4096  # tokens of context when none is asked for (lowered to a model's trained context)

UNITS = {"": GiB, "b": 1, "k": KiB, "kb": KiB, "kib": KiB, "m": MiB, "mb": MiB, "mib": MiB,
         "g": GiB, "gb": GiB, "gib": GiB, "t": TiB, "tb": TiB, "tib": TiB}


def parse_size(text: str) -> int:
    """'24G', '24GiB', '16', '512M' -> bytes. ValueError for anything else."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in UNITS:
        raise ValueError(f"not a size: {text!r} (examples: 24G, 12GiB, 512M, 0)")
    return int(float(m.group(1)) * UNITS[m.group(2).lower()])


# Bandwidths are quoted in decimal units (vendors' GB/s, our probe's "39 GB/s"); binary ones when spelled so.
RATE_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12,
              "kib": KiB, "mib": MiB, "gib": GiB, "tib": TiB}
MIN_BANDWIDTH, MAX_BANDWIDTH = 1e8, 1e14  # 0.1 GB/s .. 100 TB/s: outside it, a unit was surely left off


def parse_bandwidth(text: str) -> float:
    """'80GB/s', '80 GB/s', '80G', '80e9', '51.2GiB/s' -> bytes/s. ValueError for anything else, and for
    rates no memory has (a bare '80' is 80 bytes/s: the unit was forgotten)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z]*)(?:\s*/\s*s)?\s*", text, re.IGNORECASE)
    value = float(m.group(1)) * RATE_UNITS[m.group(2).lower()] if m and m.group(2).lower() in RATE_UNITS else None
    if value is None or not MIN_BANDWIDTH <= value <= MAX_BANDWIDTH:
        raise ValueError(f"not a memory bandwidth: {text!r} (examples: 80GB/s, 51.2GB/s, 80e9)")
    return value


def fmt_bytes(n: float) -> str:
    """1536 -> '1.50 KiB'."""
    if n < KiB:
        return f"{int(n)} B"
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024
        if n < 1024:
            return f"{n:.2f} {unit}"
    return f"{n / 1024:.2f} TiB"


def fmt_duration(seconds: float) -> str:
    """75.3 -> '1m 15.3s'."""
    m, s = divmod(seconds, 60)
    return f"{int(m)}m {s:04.1f}s" if m else f"{s:.1f}s"
