"""Tools the model can call: typed Python functions whose signatures and docstrings become JSON
schemas. Built-in ones are side-effect free; users add their own from a Python file (`--tools my.py`)
or from installed packages (entry-point group `localmix.tools`). A tool marked `side_effects=True`
runs only after the user confirms."""

from __future__ import annotations

import importlib.util
import inspect
import json
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import LocalmixError

ENTRY_POINT_GROUP = "localmix.tools"
MAX_RESULT = 20_000  # characters of a tool result the model reads; the rest is cut, with a note

# Python annotation -> JSON schema (a table, not a chain of ifs)
JSON_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean", dict: "object", list: "array"}


@dataclass
class Tool:
    name: str
    description: str
    parameters: dict
    fn: Callable = field(repr=False)
    side_effects: bool = False

    def spec(self) -> dict:
        return {"name": self.name, "description": self.description, "parameters": self.parameters}

    def call(self, arguments: dict) -> Any:
        return self.fn(**arguments)


def tool(fn: Callable | None = None, *, side_effects: bool = False, name: str | None = None):
    """Decorator marking a function as a tool (optional for plain functions in a --tools file)."""

    def wrap(f):
        f.__localmix_tool__ = {"side_effects": side_effects, "name": name or f.__name__}
        return f

    return wrap(fn) if fn is not None else wrap


def _schema_for(annotation) -> dict:
    if annotation is inspect.Parameter.empty or annotation is Any:
        return {}
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Annotated:  # Annotated[str, {"pattern": ...}]: extra JSON schema keywords
        schema = _schema_for(args[0])
        for extra in args[1:]:
            if isinstance(extra, dict):
                schema.update(extra)
        return schema
    if origin in (typing.Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        return _schema_for(options[0]) if len(options) == 1 else {"anyOf": [_schema_for(a) for a in options]}
    if origin is typing.Literal:
        return {"enum": list(args)}
    if origin in (list, tuple):
        return {"type": "array", "items": _schema_for(args[0])} if args else {"type": "array"}
    if origin is dict:
        return {"type": "object"}
    if annotation in JSON_TYPES:
        return {"type": JSON_TYPES[annotation]}
    raise LocalmixError(f"tool parameter type {annotation!r} has no JSON schema (use str, int, float, bool, list, dict, Literal)")


def _param_docs(doc: str) -> dict[str, str]:
    """'Args:' section of a Google-style docstring: name -> description."""
    out, in_args = {}, False
    for line in doc.splitlines():
        if line.strip().lower() in ("args:", "arguments:", "parameters:"):
            in_args = True
            continue
        if in_args:
            m = re.match(r"\s+(\w+)(?:\s*\(.*?\))?:\s*(.*)", line)
            if m:
                out[m.group(1)] = m.group(2).strip()
            elif line.strip() and not line.startswith((" ", "\t")):
                in_args = False
    return out


def from_function(fn: Callable, *, side_effects: bool | None = None, name: str | None = None) -> Tool:
    meta = getattr(fn, "__localmix_tool__", {})
    doc = inspect.getdoc(fn) or ""
    hints = typing.get_type_hints(fn, include_extras=True)
    docs = _param_docs(doc)
    props, required = {}, []
    for pname, p in inspect.signature(fn).parameters.items():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        schema = _schema_for(hints.get(pname, p.annotation))
        if pname in docs:
            schema["description"] = docs[pname]
        if p.default is inspect.Parameter.empty:
            required.append(pname)
        else:
            schema["default"] = p.default
        props[pname] = schema
    params = {"type": "object", "properties": props}
    if required:
        params["required"] = required
    return Tool(
        name=name or meta.get("name") or fn.__name__,
        description=doc.split("\n\n")[0].replace("\n", " ").strip(),
        parameters=params,
        fn=fn,
        side_effects=meta.get("side_effects", False) if side_effects is None else side_effects,
    )


def from_file(path: str | Path) -> list[Tool]:
    """The public functions defined in a Python file."""
    path = Path(path)
    if not path.is_file():
        raise LocalmixError(f"--tools {path}: no such file")
    spec = importlib.util.spec_from_file_location(f"localmix_user_tools_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except (Exception, SystemExit) as e:  # noqa: BLE001 - the user's code: report, don't crash or exit
        raise LocalmixError(f"--tools {path}: cannot load it: {type(e).__name__}: {e}") from None
    fns = [f for n, f in vars(module).items()
           if inspect.isfunction(f) and not n.startswith("_") and f.__module__ == module.__name__]
    if not fns:
        raise LocalmixError(f"--tools {path}: defines no public functions")
    return [from_function(f) for f in fns]


def from_entry_points() -> list[Tool]:
    """Tools installed by packages: each entry point in group `localmix.tools` names a function, or a
    module whose public functions are tools."""
    from importlib.metadata import entry_points

    out = []
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        obj = ep.load()
        if inspect.ismodule(obj):
            out += [from_function(f) for n, f in vars(obj).items()
                    if inspect.isfunction(f) and not n.startswith("_") and f.__module__ == obj.__name__]
        else:
            out.append(from_function(obj))
    return out


class ToolSet:
    def __init__(self, tools: list[Tool]):
        self.tools = {}
        for t in tools:
            if t.name in self.tools:
                raise LocalmixError(f"two tools are named {t.name!r}")
            self.tools[t.name] = t

    def specs(self) -> list[dict]:
        return [t.spec() for t in self.tools.values()]

    def __contains__(self, name: str) -> bool:
        return name in self.tools

    def __getitem__(self, name: str) -> Tool:
        return self.tools[name]

    def run(self, call: dict) -> str:
        """Call one tool; the result (or the error) as the text the model will read. Whatever the tool
        does or returns, this returns a string: a tool's failure is information for the model."""
        t = self.tools[call["name"]]
        try:
            result = t.call(call["arguments"])
            text = result if isinstance(result, str) else json.dumps(result, ensure_ascii=False, default=str)
        except (Exception, SystemExit) as e:  # noqa: BLE001 - the tool's code, or a result JSON cannot hold
            return json.dumps({"error": f"{type(e).__name__}: {_shorten(str(e))}"})
        return _shorten(text, MAX_RESULT)


def _shorten(text: str, limit: int = 500) -> str:
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text) - limit} more characters cut)"


def load_tools(files: list[str] | None = None, builtins: bool = True, entry_points: bool = True) -> ToolSet:
    from .builtin import BUILTINS

    tools = [from_function(f) for f in BUILTINS] if builtins else []
    if entry_points:
        tools += from_entry_points()
    for f in files or []:
        tools += from_file(f)
    return ToolSet(tools)
