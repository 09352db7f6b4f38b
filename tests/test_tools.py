"""Tools: schemas from typed Python functions, the safe calculator, user tool files and installed entry
points; JSON-schema grammars; and the whole loop through `localmix run` on real models."""

import json
import sys
import textwrap
from typing import Literal, Optional

import pytest
from conftest import run_cli

from localmix.errors import UserError
from localmix.tools import ToolSet, from_entry_points, from_file, from_function, load_tools
from localmix.tools.builtin import calculator, current_datetime
from localmix.tools.grammar import check_schema, grammar_for, protocol_schema


def test_schema_from_signature_and_docstring():
    def book_flight(city: str, seats: int = 1, cabin: Literal["economy", "business"] = "economy",
                    note: Optional[str] = None, tags: list[str] = ()) -> str:
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
    for evil in ("__import__('os').system('true')", "().__class__", "open('x')", "[1] * 9", "9 ** 9 ** 9", "x"):
        with pytest.raises(ValueError):
            calculator(evil)
    assert "T" in current_datetime() and "(" in current_datetime("Europe/Paris")


def test_a_failing_tool_reports_to_the_model_instead_of_crashing():
    ts = load_tools(entry_points=False)
    assert json.loads(ts.run({"name": "calculator", "arguments": {"expression": "1/0"}})) == {"error": "ZeroDivisionError: division by zero"}


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
    with pytest.raises(UserError, match="no such file"):
        from_file(tmp_path / "missing.py")
    broken = tmp_path / "broken.py"
    broken.write_text("def f(:\n")
    with pytest.raises(UserError, match="cannot load it"):
        from_file(broken)
    with pytest.raises(UserError, match="two tools"):
        ToolSet([from_function(calculator), from_function(calculator)])


def test_tools_from_installed_packages(tmp_path, monkeypatch):
    """A package that declares `[project.entry-points."localmix.tools"]`: a real distribution on sys.path."""
    (tmp_path / "weather_tools.py").write_text('def weather(city: str) -> dict:\n    """Weather in a city."""\n    return {"city": city, "sky": "clear"}\n')
    dist = tmp_path / "weather_tools-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: weather-tools\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[localmix.tools]\nweather = weather_tools:weather\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    [t] = [t for t in from_entry_points() if t.name == "weather"]
    assert t.call({"city": "Oslo"}) == {"city": "Oslo", "sky": "clear"}


@pytest.mark.parametrize("schema", [
    {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0}}, "required": ["name"]},
    {"type": "array", "items": {"type": "number"}, "minItems": 1, "maxItems": 3},
    {"type": "object", "properties": {"kind": {"enum": ["a", "b"]}, "when": {"type": "string", "format": "date"}}},
    {"anyOf": [{"type": "string"}, {"type": "object", "properties": {"x": {"type": "boolean"}}}]},
    {"$defs": {"pt": {"type": "object", "properties": {"x": {"type": "number"}, "y": {"type": "number"}}}},
     "type": "array", "items": {"$ref": "#/$defs/pt"}},
    protocol_schema(load_tools(entry_points=False).specs()),
])
def test_schemas_become_grammars(schema):
    assert grammar_for(schema) is not None


@pytest.mark.parametrize("schema, why", [
    ({"type": "object", "not": {"required": ["x"]}}, "cannot enforce"),
    ({"type": "integer", "multipleOf": 3}, "cannot enforce"),
    ({"$ref": "https://example.com/schema.json"}, "external schemas"),
    ({"type": "strnig"}, "not a valid JSON schema"),
    ([1, 2], "must be a JSON object"),
])
def test_unsupported_schemas_are_refused(schema, why):
    with pytest.raises(UserError, match=why):
        check_schema(schema)


@pytest.fixture(scope="module")
def smol(upcycled_gguf):
    return upcycled_gguf("Q4_K_M")


def test_json_schema_output_always_parses_and_validates(smol, tmp_path):
    import jsonschema

    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}, "country": {"type": "string", "maxLength": 30},
                                               "population_millions": {"type": "number"}},
              "required": ["city", "country", "population_millions"]}
    f = tmp_path / "schema.json"
    f.write_text(json.dumps(schema))
    for seed in (1, 2):
        r = run_cli("run", str(smol), "Describe Paris as JSON.", "--json-schema", str(f), "--seed", str(seed),
                    "--max-tokens", "200", "--ctx", "1024")
        assert r.returncode == 0, r.stderr
        jsonschema.validate(json.loads(r.stdout), schema)
    r = run_cli("run", str(smol), 'Reply with a JSON object with the keys "name" and "age" for a cat.', "--json",
                "--max-tokens", "120", "--ctx", "1024", "--temperature", "0")
    assert r.returncode == 0 and isinstance(json.loads(r.stdout), dict)
    # a grammar cannot make a model stop: output cut by --max-tokens is an error, not broken JSON on stdout
    r = run_cli("run", str(smol), "Give me a JSON object about cats.", "--json", "--max-tokens", "40", "--ctx", "1024", "--temperature", "0")
    assert r.returncode == 1 and "cut by --max-tokens" in r.stderr
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"type": "object", "not": {}}))
    r = run_cli("run", str(smol), "x", "--json-schema", str(bad))
    assert r.returncode == 1 and "cannot enforce" in r.stderr and "Traceback" not in r.stderr


def test_demo_model_calls_the_calculator_under_a_grammar_and_uses_the_result(tmp_path):
    """The demo model (SmolLM2 upcycled, no native tools: the JSON protocol) must call the calculator;
    the result goes back to it and it answers in words."""
    from localmix.demo import ensure_demo

    demo = ensure_demo()
    r = run_cli("run", str(demo), "What is 12*7+3?", "--tools", "--tool-choice", "calculator", "--temperature", "0",
                "--max-tokens", "128", "--ctx", "2048")
    assert r.returncode == 0, r.stderr
    assert 'tool: calculator({"expression": "12*7 + 3"}) -> 87' in r.stderr
    assert r.stdout.strip() and not r.stdout.lstrip().startswith("{")


def test_print_prompt_with_tools(tiny_gguf, smol):
    native = run_cli("run", str(tiny_gguf("Q4_K_M")), "What is 2+2?", "--tools", "--print-prompt")
    assert native.returncode == 0, native.stderr
    assert native.stdout.startswith("<s>[AVAILABLE_TOOLS][{\"type\": \"function\", \"function\": {\"name\": \"calculator\"")
    assert native.stdout.endswith("[/AVAILABLE_TOOLS][INST]What is 2+2?[/INST]")
    protocol = run_cli("run", str(smol), "What is 2+2?", "--tools", "--print-prompt")
    assert protocol.returncode == 0 and '{"tool_calls": [' in protocol.stdout and "calculator" in protocol.stdout


def test_side_effect_tools_need_consent(tmp_path):
    from localmix.demo import ensure_demo

    f = tmp_path / "notes.py"
    target = tmp_path / "note.txt"
    f.write_text(textwrap.dedent(f'''
        from typing import Annotated
        from localmix.tools import tool

        @tool(side_effects=True)
        def save_note(text: Annotated[str, {{"maxLength": 20}}]) -> str:
            """Save a note."""
            open({str(target)!r}, "w").write(text)
            return "saved"
    '''))
    args = ("run", str(ensure_demo()), "Save a note saying hello.", "--tools", str(f), "--tool-choice", "save_note",
            "--temperature", "0", "--max-tokens", "64", "--ctx", "2048")
    r = run_cli(*args, stdin=subprocess_devnull())
    assert r.returncode == 0, r.stderr
    assert "refused save_note" in r.stderr and not target.exists()
    r = run_cli(*args, "--yes")
    assert r.returncode == 0, r.stderr
    assert target.exists() and "tool: save_note(" in r.stderr


def subprocess_devnull():
    import subprocess

    return subprocess.DEVNULL


def test_tool_flags_need_tools():
    r = run_cli("run", "x.gguf", "hi", "--tool-choice", "required")
    assert r.returncode == 1 and "--tool-choice needs --tools" in r.stderr
    assert sys.executable


def test_native_mistral_tool_path_end_to_end(tiny_gguf):
    """A model with Mistral's tool tokens (the v3 vocabulary): the reply is forced to start with
    [TOOL_CALLS] and follow the calls grammar, so even random weights produce a call that parses; its
    result goes back as [TOOL_RESULTS] and the model then answers in words."""
    r = run_cli("run", str(tiny_gguf("Q4_K_M")), "What is 2+2?", "--tools", "--tool-choice", "calculator",
                "--temperature", "0", "--max-tokens", "60", "--ctx", "1024")
    assert r.returncode == 0, r.stderr
    assert r.stderr.startswith('tool: calculator({"expression": ')
    assert r.stdout.strip() and not r.stdout.startswith("[")
