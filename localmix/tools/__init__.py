"""Tools the model can call: typed Python functions whose signatures and docstrings become JSON
schemas. Built-in ones are side-effect free; users add their own from a Python file (`--tools my.py`)
or from installed packages (entry-point group `localmix.tools`). A tool marked `side_effects=True`
runs only after the user confirms."""

from __future__ import annotations

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
from ..text import shown

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
    raise LocalmixError(f"tool parameter type {shown(repr(annotation))} has no JSON schema "
                        "(use str, int, float, bool, list, dict, Literal)")


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


def _hints(fn: Callable, params) -> dict:
    """The parameters' types. Hints that exist only for type checkers (imported under TYPE_CHECKING) do
    not resolve: get_type_hints fails on any of them, the return type included, which a tool does not
    need; so each parameter is then resolved on its own, and one that cannot be is named."""
    try:
        return typing.get_type_hints(fn, include_extras=True)
    except Exception:  # noqa: BLE001 - NameError and others from evaluating the user's annotations
        pass
    hints = {}
    for pname, p in params.items():
        if isinstance(p.annotation, str):
            try:
                # the user's own code, as the rest of the file that was just run
                hints[pname] = eval(p.annotation, dict(getattr(fn, "__globals__", {})))
            except BaseException as e:  # noqa: BLE001
                raise LocalmixError(f"tool {fn.__name__}: the type of parameter {pname} ({shown(p.annotation)}) "
                                    f"cannot be resolved: {type(e).__name__}: {shown(e)}") from None
    return hints


def _json_default(value) -> tuple[bool, Any]:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False, None
    return True, value


def from_function(fn: Callable, *, side_effects: bool | None = None, name: str | None = None) -> Tool:
    meta = getattr(fn, "__localmix_tool__", {})
    doc = inspect.getdoc(fn) or ""
    params = inspect.signature(fn).parameters
    hints = _hints(fn, params)
    docs = _param_docs(doc)
    props, required = {}, []
    for pname, p in params.items():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        try:
            schema = _schema_for(hints.get(pname, p.annotation))
        except LocalmixError as e:
            raise LocalmixError(f"tool {shown(fn.__name__)}, parameter {pname}: {e}") from None
        if pname in docs:
            schema["description"] = docs[pname]
        if p.default is inspect.Parameter.empty:
            required.append(pname)
        else:
            ok, default = _json_default(p.default)
            if ok:  # a default JSON cannot write is left out of the schema (the function still has it)
                schema["default"] = default
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


def _why(e: BaseException) -> str:
    return shown(f"{type(e).__name__}: {e}" if str(e) else type(e).__name__)


def from_file(path: str | Path) -> list[Tool]:
    """The public functions defined in a Python file. Whatever the file does when it is imported (raise,
    call sys.exit(), fail to parse) is one LocalmixError naming it, never the end of localmix."""
    import sys

    path = Path(path)
    where = f"--tools {shown(path)}"
    if not path.is_file():
        raise LocalmixError(f"{where}: no such file")
    # Run as a module of its own, from source: any file name, and no __pycache__ left beside the file.
    module = types.ModuleType(f"localmix_user_tools_{abs(hash(str(path.resolve())))}")
    module.__file__ = str(path)
    sys.modules[module.__name__] = module  # dataclasses and pickling look their module up while the file runs
    try:
        exec(compile(path.read_bytes(), str(path), "exec"), module.__dict__)
    except BaseException as e:  # noqa: BLE001 - the user's code: SystemExit, KeyboardInterrupt... report, don't end
        sys.modules.pop(module.__name__, None)
        raise LocalmixError(f"{where}: cannot load it: {_why(e)}") from None
    fns = [f for n, f in vars(module).items()
           if inspect.isfunction(f) and not n.startswith("_") and f.__module__ == module.__name__]
    if not fns:
        raise LocalmixError(f"{where}: defines no public functions")
    return [_tool_from(where, f) for f in fns]


def _tool_from(where: str, fn: Callable) -> Tool:
    try:
        return from_function(fn)
    except LocalmixError as e:
        raise LocalmixError(f"{where}: {e}") from None
    except Exception as e:  # noqa: BLE001 - a signature inspect cannot read, a decorator's odd object
        raise LocalmixError(f"{where}: {getattr(fn, '__name__', 'a function')}: {_why(e)}") from None


def from_entry_points() -> list[Tool]:
    """Tools installed by packages: each entry point in group `localmix.tools` names a function, or a
    module whose public functions are tools."""
    from importlib.metadata import entry_points

    out = []
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        where = f"tools entry point {shown(ep.name)} ({shown(ep.value)})"
        try:
            obj = ep.load()
        except BaseException as e:  # noqa: BLE001 - an installed package's code, as a --tools file's
            raise LocalmixError(f"{where}: cannot load it: {_why(e)}") from None
        if inspect.ismodule(obj):
            out += [_tool_from(where, f) for n, f in vars(obj).items()
                    if inspect.isfunction(f) and not n.startswith("_") and f.__module__ == obj.__name__]
        else:
            out.append(_tool_from(where, obj))
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
