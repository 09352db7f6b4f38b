"""Text that came from a file (a model's name, its chat template, metadata, an error naming them) made
safe to show: control characters escaped so nothing reaches the terminal as an escape sequence, lengths
bounded, and (for rich) markup escaped so `[/INST]` is text, not a tag."""

from __future__ import annotations

import unicodedata

MAX_SHOWN = 200  # characters of one shown string; a 100,000-character name is not a name


def shown(value: object, limit: int = MAX_SHOWN) -> str:
    """`value` as one printable line: C0/C1 controls, DEL and other non-printing characters (bidi
    overrides, zero-width) as \\xNN / \\uNNNN, invalid UTF-8 as \\xNN, cut to `limit` characters."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="backslashreplace")
    text = str(value)
    cut = len(text) > limit
    text = text[:limit]
    out = []
    for ch in text:
        if ch == "\\" or (ch.isprintable() and unicodedata.category(ch) not in ("Cf",)):
            out.append(ch)
        elif ord(ch) < 0x100:
            out.append(f"\\x{ord(ch):02x}")
        elif ord(ch) < 0x10000:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(f"\\U{ord(ch):08x}")
    s = "".join(out)
    return s + f"... ({len(str(value)):,} characters)" if cut else s


def markup(value: object, limit: int = MAX_SHOWN) -> str:
    """`shown(value)` with rich markup escaped, for f-strings passed to a rich Console with markup on."""
    from rich.markup import escape

    return escape(shown(value, limit))


_CONTROLS = {c: f"\\x{c:02x}" for c in [*range(0x20), *range(0x7F, 0xA0)] if chr(c) not in "\n\t"}


def terminal_safe(text: str) -> str:
    """Multi-line text (a model's reply) for a terminal: lines and tabs kept, every other control character
    (ESC, BEL, CR, backspace, C1) escaped, so a reply cannot move the cursor, retitle or clear the screen."""
    return text.translate(_CONTROLS)
