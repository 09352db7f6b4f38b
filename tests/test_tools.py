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


