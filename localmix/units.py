"""Sizes and durations: parsed from what users type, formatted for what they read. Binary units
throughout, as GPU vendors and `free -g` count; a bare number is GiB."""

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
