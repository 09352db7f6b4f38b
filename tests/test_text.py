"""Text from files and models made safe to show: nothing reaches the terminal as an escape sequence or
rich markup, and nothing is unbounded."""

from rich.console import Console

from localmix.text import markup, shown, terminal_safe


def test_shown_escapes_controls_and_bounds_length():
    assert shown("Mixtral\x1b]0;owned\x07\x1b[2J") == "Mixtral\\x1b]0;owned\\x07\\x1b[2J"
    assert shown("a\u202eb\u200bc\x9b") == "a\\u202eb\\u200bc\\x9b"  # bidi override, zero width, C1 CSI
    assert shown(b"ok\xff") == "ok\\xff"  # bytes that are not UTF-8
    assert shown("x" * 100_000).endswith("... (100,000 characters)") and len(shown("x" * 100_000)) < 250
    assert shown("Mixtral 8x7B — ünïcode 模型") == "Mixtral 8x7B — ünïcode 模型"  # printable text untouched


def test_markup_is_text_for_rich():
    con = Console(record=True, width=80, color_system=None)
    con.print(f"model {markup('[/INST] [bold]x[/bold] [link=file:///etc]y')}")
    assert "[/INST] [bold]x[/bold] [link=file:///etc]y" in con.export_text()


def test_terminal_safe_keeps_lines_and_tabs_only():
    assert terminal_safe("line 1\n\tline 2") == "line 1\n\tline 2"
    assert terminal_safe("a\x1b[2J\rb\x08\x07\x9b") == "a\\x1b[2J\\x0db\\x08\\x07\\x9b"
