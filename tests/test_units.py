"""Sizes as users type them, and as they read them."""

import pytest

from localmix.units import GiB, fmt_bytes, fmt_duration, parse_size


def test_parse_size():
    assert parse_size("24G") == parse_size("24GiB") == parse_size("24") == 24 * GiB
    assert parse_size("512M") == 512 << 20 and parse_size("0") == 0 and parse_size("1.5g") == 3 << 29
    assert parse_size(" 2 tb ") == 2 << 40 and parse_size("100b") == 100
    for bad in ("lots", "", "12 parsecs", "-1G", "1e3G"):
        with pytest.raises(ValueError, match="not a size"):
            parse_size(bad)


def test_formatting():
    assert fmt_bytes(100) == "100 B" and fmt_bytes(1536) == "1.50 KiB"
    assert fmt_bytes(468.13 * 2**20) == "468.13 MiB" and fmt_bytes(3 * 2**40) == "3.00 TiB"
    assert fmt_duration(6.14) == "6.1s" and fmt_duration(75.3) == "1m 15.3s"
