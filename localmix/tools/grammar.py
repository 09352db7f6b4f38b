"""Constrained output: JSON schemas to llama.cpp grammars (GBNF text, made by llama-cpp-python's pure
Python converter; the backend compiles it), and the schemas of tool calls, so that even a small model
emits output that parses and validates."""

from __future__ import annotations

import json

from ..errors import LocalmixError

# Keywords llama.cpp's schema converter does not enforce: a schema that uses them is refused rather than
# producing output that would not validate.
UNSUPPORTED = ("not", "if", "then", "else", "dependentSchemas", "dependentRequired", "patternProperties", "contains",
               "uniqueItems", "multipleOf", "propertyNames", "unevaluatedProperties", "unevaluatedItems")

ANY_JSON_OBJECT = {"type": "object"}
MAX_DEPTH = 64  # levels of nested objects and lists in a schema; every checker and converter recurses through them


def depth(value) -> int:
    """How deeply lists and dicts nest in `value`, counted without recursion (a schema nested 10,000 deep
    must get an answer, not a RecursionError)."""
    deepest, todo = 0, [(value, 1)]
    while todo:
        node, level = todo.pop()
        if isinstance(node, (dict, list)):
            deepest = max(deepest, level)
            if level <= MAX_DEPTH:  # deeper is already too deep: no need to walk all of it
                todo += [(v, level + 1) for v in (node.values() if isinstance(node, dict) else node)]
    return deepest


def check_schema(schema) -> None:
    import jsonschema

    if not isinstance(schema, dict):
        raise LocalmixError("a JSON schema must be a JSON object")
    if depth(schema) > MAX_DEPTH:
        raise LocalmixError(f"this JSON schema is nested more than {MAX_DEPTH} levels deep")
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as e:
        raise LocalmixError(f"not a valid JSON schema: {e.message}") from None
    found = sorted(_keywords(schema) & set(UNSUPPORTED))
    if found:
        raise LocalmixError(f"this JSON schema uses {', '.join(found)}, which constrained generation cannot enforce")
    refs = [r for r in _refs(schema) if not r.startswith("#")]
    if refs:
        raise LocalmixError(f"this JSON schema refers to external schemas ({refs[0]}); inline them")


def _keywords(node) -> set[str]:
    out = set()
    if isinstance(node, dict):
        for k, v in node.items():
            if k != "properties" and k != "$defs" and k != "definitions":
                out.add(k)
            if k in ("properties", "$defs", "definitions") and isinstance(v, dict):
                for sub in v.values():
                    out |= _keywords(sub)
            else:
                out |= _keywords(v)
    elif isinstance(node, list):
        for v in node:
            out |= _keywords(v)
    return out


def _refs(node) -> list[str]:
    if isinstance(node, dict):
        return ([node["$ref"]] if isinstance(node.get("$ref"), str) else []) + [r for v in node.values() for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


def grammar_for(schema: dict) -> str:
    """A grammar (GBNF) that only lets the model write JSON valid under `schema`."""
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    check_schema(schema)
    try:
        return json_schema_to_gbnf(json.dumps(schema))
    except Exception as e:  # noqa: BLE001 - the converter raises plain exceptions on what it cannot express
        raise LocalmixError(f"this JSON schema cannot be turned into a grammar: {e}") from None


def validate(text: str, schema: dict):
    """The parsed output, or a LocalmixError saying why it does not validate."""
    import jsonschema

    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise LocalmixError(f"the output is not JSON ({e.msg}); was it cut by --max-tokens?") from None
    try:
        jsonschema.validate(value, schema)
    except jsonschema.ValidationError as e:
        raise LocalmixError(f"the output does not match the schema: {e.message}") from None
    return value


def call_schema(tools: list[dict]) -> dict:
    """One call of any of `tools`: {"name": <one of them>, "arguments": <its parameters>}."""
    options = [
        {"type": "object", "properties": {"name": {"const": t["name"]}, "arguments": t.get("parameters") or {"type": "object"}},
         "required": ["name", "arguments"]}
        for t in tools
    ]
    return options[0] if len(options) == 1 else {"anyOf": options}


def native_calls_schema(tools: list[dict], max_calls: int | None = None) -> dict:
    """Mistral's [TOOL_CALLS] payload: a list of one or more calls (at most max_calls)."""
    schema = {"type": "array", "items": call_schema(tools), "minItems": 1}
    return schema | {"maxItems": max_calls} if max_calls else schema


def protocol_schema(tools: list[dict], max_calls: int | None = None) -> dict:
    """The JSON tool-call protocol for models without native tools: {"tool_calls": [calls]}."""
    return {"type": "object", "properties": {"tool_calls": native_calls_schema(tools, max_calls)}, "required": ["tool_calls"]}


# A reply in words: anything that does not open a JSON object or list (a tool call), as the first
# visible character. Used after a forced round of calls, so that the answer comes in words.
WORDS_GBNF = r"root ::= [^{\[ \t\n] [^\x00]*"


def call_or_words_grammar(schema: dict) -> str:
    """Either a tool call valid under `schema` or an answer in words: the model decides, and whichever
    it picks comes out well-formed (the JSON protocol's "auto" rounds)."""
    import re

    gbnf = re.sub(r"^root ::=", "call ::=", grammar_for(schema), flags=re.M)
    words = WORDS_GBNF.replace("root ::=", "words ::=")
    return f"root ::= call | words\n{gbnf}\n{words}"
