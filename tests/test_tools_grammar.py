"""JSON schemas to grammars that llama.cpp itself parses (checked on a real vocabulary), the schemas of
tool calls, and validation of what comes out."""

import pytest

from localmix.errors import LocalmixError
from localmix.llamacpp import Engine
from localmix.tools import load_tools
from localmix.tools.grammar import (
    WORDS_GBNF,
    call_or_words_grammar,
    check_schema,
    grammar_for,
    native_calls_schema,
    protocol_schema,
    validate,
)

SPECS = load_tools(entry_points=False).specs()


@pytest.fixture(scope="module")
def vocab(tiny_gguf):
    v = Engine.vocab_only(tiny_gguf("Q4_K_M"))
    yield v
    v.close()


@pytest.mark.parametrize("schema", [
    {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0}}, "required": ["name"]},
    {"type": "array", "items": {"type": "number"}, "minItems": 1, "maxItems": 3},
    {"type": "object", "properties": {"kind": {"enum": ["a", "b"]}, "when": {"type": "string", "format": "date"}}},
    {"anyOf": [{"type": "string"}, {"type": "object", "properties": {"x": {"type": "boolean"}}}]},
    {"$defs": {"pt": {"type": "object", "properties": {"x": {"type": "number"}, "y": {"type": "number"}}}},
     "type": "array", "items": {"$ref": "#/$defs/pt"}},
    protocol_schema(SPECS),
    native_calls_schema(SPECS),
])
def test_schemas_become_grammars_llama_cpp_parses(schema, vocab):
    assert vocab.accepts_grammar(grammar_for(schema))


def test_the_tool_grammars_parse(vocab):
    assert vocab.accepts_grammar(WORDS_GBNF)
    assert vocab.accepts_grammar(call_or_words_grammar(protocol_schema(SPECS)))
    assert not vocab.accepts_grammar("root ::= (")  # the check can fail


@pytest.mark.parametrize("schema, why", [
    ({"type": "object", "not": {"required": ["x"]}}, "cannot enforce"),
    ({"type": "integer", "multipleOf": 3}, "cannot enforce"),
    ({"$ref": "https://example.com/schema.json"}, "external schemas"),
    ({"type": "strnig"}, "not a valid JSON schema"),
    ([1, 2], "must be a JSON object"),
])
def test_unsupported_schemas_are_refused(schema, why):
    with pytest.raises(LocalmixError, match=why):
        check_schema(schema)


def test_validate():
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    assert validate('{"n": 3}', schema) == {"n": 3}
    with pytest.raises(LocalmixError, match="not JSON .*cut by --max-tokens"):
        validate('{"n": ', schema)
    with pytest.raises(LocalmixError, match="does not match the schema"):
        validate('{"m": 3}', schema)


@pytest.mark.parametrize("levels", [70, 300, 100_000])
def test_a_schema_nested_too_deep_is_one_line(levels):
    """Refused before any checker or converter recurses through it (a RecursionError otherwise)."""
    schema = {"type": "string"}
    for _ in range(levels):
        schema = {"type": "array", "items": schema}
    with pytest.raises(LocalmixError, match="nested more than 64 levels deep"):
        grammar_for(schema)
    with pytest.raises(LocalmixError, match="nested more than 64 levels deep"):
        check_schema({"type": "object", "properties": {"a": schema}})
