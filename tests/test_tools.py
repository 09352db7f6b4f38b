"""Tools: schemas from typed Python functions, the safe calculator, user tool files and installed entry
points, and results that always reach the model as text."""

import json
import textwrap
from typing import Literal

import pytest

from localmix.errors import LocalmixError
from localmix.tools import ToolSet, from_entry_points, from_file, from_function, load_tools
from localmix.tools.builtin import calculator, current_datetime
from localmix.tools.grammar import check_schema


def test_schema_from_signature_and_docstring():
    def book_flight(city: str, seats: int = 1, cabin: Literal["economy", "business"] = "economy",
                    note: str | None = None, tags: list[str] = ()) -> str:
        """Book a flight.

        Args:
            city: where to fly
            seats: how many seats
        """

    t = from_function(book_flight)
    assert t.name == "book_flight" and t.description == "Book a flight."
    p = t.parameters
    assert p["required"] == ["city"]
    assert p["properties"]["city"] == {"type": "string", "description": "where to fly"}
    assert p["properties"]["seats"] == {"type": "integer", "description": "how many seats", "default": 1}
    assert p["properties"]["cabin"]["enum"] == ["economy", "business"]
    assert p["properties"]["note"]["type"] == "string" and p["properties"]["tags"]["items"] == {"type": "string"}
    check_schema(p)


def test_calculator_is_exact_and_safe():
    assert calculator("(2 + 3) * 7 / 2") == 17.5
    assert calculator("2 ** 10 + 17 % 5") == 1026 and calculator("sqrt(16) + pi") == pytest.approx(7.14159, 1e-5)
    assert calculator("2^8") == 256
    for evil in ("__import__('os').system('true')", "().__class__", "open('x')", "[1] * 9", "9 ** 9 ** 9", "x",
                 "9**9999", "(9^9999)^9999", "2**3999 * 2**3999"):
        with pytest.raises(ValueError):
            calculator(evil)
    assert calculator("2**1000") == 2**1000
    assert "T" in current_datetime() and "(" in current_datetime("Europe/Paris")


def test_a_failing_tool_reports_to_the_model_instead_of_crashing():
    ts = load_tools(entry_points=False)
    divide = ts.run({"name": "calculator", "arguments": {"expression": "1/0"}})
    assert json.loads(divide) == {"error": "ZeroDivisionError: division by zero"}
    assert "more than 1200 digits" in json.loads(ts.run({"name": "calculator", "arguments": {"expression": "9**9999"}}))["error"]


def test_any_result_reaches_the_model_as_text():
    """Results JSON cannot hold (an integer of 5000 digits), results too long to read, a tool that exits."""
    import sys

    def huge() -> int:
        """A big number."""
        return 10**5000

    def long() -> str:
        """A long text."""
        return "x" * 100_000

    def leave() -> str:
        """Exit."""
        sys.exit(3)

    ts = ToolSet([from_function(f) for f in (huge, long, leave)])
    assert "ValueError" in json.loads(ts.run({"name": "huge", "arguments": {}}))["error"]
    text = ts.run({"name": "long", "arguments": {}})
    assert len(text) < 21_000 and text.endswith("(80000 more characters cut)")
    assert json.loads(ts.run({"name": "leave", "arguments": {}}))["error"].startswith("SystemExit")


def test_tools_from_a_file(tmp_path):
    f = tmp_path / "mytools.py"
    f.write_text(textwrap.dedent('''
        from localmix.tools import tool
        import os

        def shout(text: str) -> str:
            """Upper-case a text."""
            return text.upper()

        @tool(side_effects=True)
        def write_note(path: str, text: str) -> str:
            """Write a note to a file."""
            with open(path, "w") as f:
                f.write(text)
            return "written"

        def _private(x: int) -> int:
            return x
    '''))
    tools = {t.name: t for t in from_file(f)}
    assert set(tools) == {"shout", "write_note"}
    assert tools["write_note"].side_effects and not tools["shout"].side_effects
    with pytest.raises(LocalmixError, match="no such file"):
        from_file(tmp_path / "missing.py")
    broken = tmp_path / "broken.py"
    broken.write_text("def f(:\n")
    with pytest.raises(LocalmixError, match="cannot load it"):
        from_file(broken)
    leaving = tmp_path / "leaving.py"
    leaving.write_text("import sys\nsys.exit(4)\n")
    with pytest.raises(LocalmixError, match="cannot load it: SystemExit"):
        from_file(leaving)
    with pytest.raises(LocalmixError, match="two tools"):
        ToolSet([from_function(calculator), from_function(calculator)])


def test_tools_from_installed_packages(tmp_path, monkeypatch):
    """A package that declares `[project.entry-points."localmix.tools"]`: a real distribution on sys.path."""
    (tmp_path / "weather_tools.py").write_text(
        'def weather(city: str) -> dict:\n    """Weather in a city."""\n    return {"city": city, "sky": "clear"}\n')
    dist = tmp_path / "weather_tools-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: weather-tools\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[localmix.tools]\nweather = weather_tools:weather\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    [t] = [t for t in from_entry_points() if t.name == "weather"]
    assert t.call({"city": "Oslo"}) == {"city": "Oslo", "sky": "clear"}




# Expressions a model (or a prompt injection) may send: each is an answer or an error for the model, at once.
HOSTILE_EXPRESSIONS = [
    "9**9**9", "(9^9999)^9999", "(9**999)**999", "9**999*9**999*9**999*9**999*9**999", "2**3999 * 2**3999",
    "floor(1e308)**10", "floor(1e308)*floor(1e308)*floor(1e308)*floor(1e308)*floor(1e308)", "ceil(1e308)**9",
    "max(2**3999, 1)**2", "abs(-2**3999)*abs(-2**3999)", "min(2**3999, 2**3998) * 2**3999", "floor(exp(709))**4",
    "round(floor(1e308), -10**9)", "round(floor(1e308)**3, -99999999)", "round(1.5, 10**9)", "round(9**999, -5000)",
    "10**-10000", "2**-9999", "2**0.5**-1000", "0**-1", "(-8)**(1/3)", "sqrt((-8)**(1/3))", "(-1)**0.5 ** 9999",
    "2**3999/3", "(2**3999)**0.5", "cos(2**3999)", "log(2**3999)**2", "9.0**9999", "floor(2.5**9999)", "1e999", "1e308*10",
    "exp(1000)", "exp(exp(exp(10)))", "log(0)", "log10(-1)", "sqrt(-1)", "1/0", "5 % 0", "5 // 0.0", "min()", "abs()", "round()",
    "-" * 499 + "1", "(" * 300 + "1" + ")" * 300, "(" * 100 + "1" + ")" * 100, "1" + "+1" * 249, "9" * 500, "\x00", "",
    "1 if 1 else 2", "lambda: 1", "[1] * 10**9", "'x' * 10**9", "__import__('os')", "pi ** pi ** pi ** pi",
]


@pytest.mark.parametrize("expression", HOSTILE_EXPRESSIONS)
def test_the_calculator_answers_every_expression_at_once(expression):
    """Every intermediate result is bounded, not only the last: a 15-character expression cannot take
    minutes, and no result is too long to print."""
    import time

    ts = load_tools(entry_points=False)
    t0 = time.monotonic()
    result = ts.run({"name": "calculator", "arguments": {"expression": expression}})
    assert time.monotonic() - t0 < 1 and isinstance(result, str) and len(result) < 2000


def test_a_tools_file_that_fails_at_import_is_one_line(tmp_path):
    """Whatever a file does at import (exit, interrupt, raise, not parse, not be Python) is a LocalmixError
    naming it; localmix never ends with the file's exit code."""
    bodies = {
        "exits.py": "import sys\nsys.exit(0)\n", "exits_string.py": "raise SystemExit('bye')\n",
        "interrupts.py": "raise KeyboardInterrupt\n", "base.py": "raise BaseException('odd')\n",
        "raises.py": "1/0\n", "nul.py": "x = 1\x00\n", "latin1.py": b"s = '\xff\xfe'\n",
    }
    for name, body in bodies.items():
        f = tmp_path / name
        f.write_bytes(body if isinstance(body, bytes) else body.encode())
        with pytest.raises(LocalmixError, match=f"--tools {f}: cannot load it") as e:
            from_file(f)
        assert "\n" not in str(e.value)
    (tmp_path / "folder.py").mkdir()
    with pytest.raises(LocalmixError, match="no such file"):
        from_file(tmp_path / "folder.py")


def test_tools_files_with_any_name_hints_and_defaults(tmp_path):
    """A file not named .py; hints only a type checker sees (the return type is not needed; a parameter
    type is, and is named); defaults JSON cannot write; a dataclass in the file."""
    f = tmp_path / "tools.txt"
    f.write_text(textwrap.dedent('''
        from __future__ import annotations
        import pathlib
        from dataclasses import dataclass
        from typing import TYPE_CHECKING
        if TYPE_CHECKING:
            from pathlib import Path

        @dataclass
        class Point:
            x: int

        def size(name: str, unit: str = "B", base: str = pathlib.Path(".")) -> Path:
            """Size of a file."""
            return name
    '''))
    [t] = from_file(f)
    assert t.parameters["properties"]["unit"]["default"] == "B" and "default" not in t.parameters["properties"]["base"]
    json.dumps(t.spec())
    g = tmp_path / "unresolved.py"
    g.write_text("from __future__ import annotations\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                 "    from pathlib import Path\n\ndef open_it(p: Path) -> str:\n    '''Open.'''\n")
    with pytest.raises(LocalmixError, match=r"unresolved.py: tool open_it: the type of parameter p \(Path\) cannot be resolved"):
        from_file(g)


def test_an_installed_tool_that_fails_to_load_is_one_line(tmp_path, monkeypatch):
    (tmp_path / "broken_tools.py").write_text("import sys\nsys.exit(2)\n")
    dist = tmp_path / "broken_tools-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-tools\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[localmix.tools]\nbroken = broken_tools\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(LocalmixError, match=r"tools entry point broken \(broken_tools\): cannot load it: SystemExit: 2"):
        from_entry_points()


def test_run_with_hostile_tools_files_schemas_and_calls(tmp_path):
    """`localmix run` with each hostile tools file and schema, and calculator calls forced on a small real
    model: success or one line, never a traceback, a hang, a silent exit or a file left behind."""
    from localmix.hardware import detect
    from tests.fuzz.harness import Harness, failures, leftovers
    from tests.fuzz.tools import cases

    detect()  # the bandwidth probes once, before the forks
    all_cases = cases(seed=1, n=40, workdir=tmp_path)
    with Harness() as h:
        outcomes = h.run(all_cases)
    assert all(o.ok for o in outcomes), failures(outcomes)
    assert not leftovers(outcomes)
    by_label = {o.case.label: o for o in outcomes}
    for label in ("exits 0", "exits 3", "interrupts"):
        assert by_label[f"tools file: {label}"].code == 1  # never the file's own exit code, never silent
    assert by_label["tools file: fine"].code == 0
