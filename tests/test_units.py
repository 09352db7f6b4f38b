"""Sizes as users type them, and as they read them."""

import pytest

from localmix.units import GiB, fmt_bytes, fmt_duration, parse_bandwidth, parse_size


def test_parse_size():
    assert parse_size("24G") == parse_size("24GiB") == parse_size("24") == 24 * GiB
    assert parse_size("512M") == 512 << 20 and parse_size("0") == 0 and parse_size("1.5g") == 3 << 29
    assert parse_size(" 2 tb ") == 2 << 40 and parse_size("100b") == 100
    for bad in ("lots", "", "12 parsecs", "-1G", "1e3G"):
        with pytest.raises(ValueError, match="not a size"):
            parse_size(bad)


def test_parse_bandwidth():
    """Decimal units, as memory is sold and our probe reports it; binary ones when spelled so."""
    assert parse_bandwidth("80GB/s") == parse_bandwidth("80 GB/s") == parse_bandwidth("80e9") == parse_bandwidth("80G") == 80e9
    assert parse_bandwidth(" 51.2 gb / s ") == 51.2e9 and parse_bandwidth("1.2TB/s") == 1.2e12
    assert parse_bandwidth("64GiB/s") == 64 * GiB and parse_bandwidth("900000M") == 9e11
    # A bare 80 would be 80 bytes/s: a unit left off, not a memory; so are rates beyond any memory.
    for bad in ("80", "lots", "", "GB/s", "80GB/", "-5G", "nan", "inf", "1e400", "80 parsecs", "80e9GB/s", "0"):
        with pytest.raises(ValueError, match="not a memory bandwidth"):
            parse_bandwidth(bad)


def test_formatting():
    assert fmt_bytes(100) == "100 B" and fmt_bytes(1536) == "1.50 KiB"
    assert fmt_bytes(468.13 * 2**20) == "468.13 MiB" and fmt_bytes(3 * 2**40) == "3.00 TiB"
    assert fmt_duration(6.14) == "6.1s" and fmt_duration(75.3) == "1m 15.3s"
