"""Rendering a conversation with the model's own chat template (the GGUF's tokenizer.chat_template), in
Jinja's sandbox as Hugging Face does, under limits: the template is a stranger's code. Templates that
refuse a system role (Mixtral's raises "Only user and assistant roles are supported!") get the system
prompt folded into the first user turn instead of having it silently dropped.

The sandbox stops a template from reaching Python's internals; the limits stop it from taking the
machine: a time budget (the clock is checked at each step of every loop, each call, filter, operator and
join the template makes), a size budget for every string, list or number it makes (checked before the
one C-level operation that would make it: `9**(9**9)`, `'x' * 10**10`, `'x'|center(10**10)`...), for all
of them together and for its output, and no loader (include, extends and import fail). Whatever goes
wrong is one TemplateError line.

`render_marked` also says which parts of the text are the messages' content: each content is rendered
between two marker characters, so that the caller can tokenize content as data and only the template's
own markup as control tokens."""

from __future__ import annotations

import functools
import re
import string
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from functools import lru_cache

from ..errors import TemplateError
from ..text import shown

# Used when a GGUF has no template at all: plain ChatML.
CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

MAX_SECONDS = 2.0  # a chat template renders a conversation in milliseconds
MAX_SIZE = 1_000_000  # characters of any string (or items of any list) a template makes, besides the conversation's own
MAX_INT_BITS = 100_000  # about 30,000 digits: no template needs more, 9**(9**9) would take minutes
MAX_WIDTH = 100_000  # a field width in a format string or a filter argument
MAX_TEMPLATE = 256_000  # characters of template source; real ones have a few thousand
PREFIX = "the model's chat template failed: "


class _Raised(Exception):
    """raise_exception() called by the template itself."""


class _OverBudget(BaseException):
    """Time is up. A BaseException: nothing in Jinja's runtime (or the template) catches it."""


class _TooBig(Exception):
    pass


def _raise(message):
    raise _Raised(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(str(fmt)[:100])


# -- sizes ----------------------------------------------------------------------------------------------

# The budget of the render running on this thread: .size (of any value), .made (so far), .deadline.
_limit = threading.local()
MADE = 16  # all the strings and lists a render makes, together, at most this many times its size budget


def _tick() -> None:
    if time.monotonic() > getattr(_limit, "deadline", float("inf")):
        raise _OverBudget


def _max_size() -> int:
    return getattr(_limit, "size", MAX_SIZE)


def _check(size: int, what: str = "a value") -> None:
    if size > _max_size():
        raise _TooBig(f"it makes {what} of more than {_max_size():,} characters")


def _size(value) -> int:
    return len(value) if isinstance(value, (str, list, tuple, dict)) else 0


def _made(size: int) -> None:
    """Counts what a render makes, so that many values each within the budget (a million slices kept in
    a list) cannot take the memory either."""
    _limit.made = getattr(_limit, "made", 0) + size
    if _limit.made > MADE * _max_size():
        raise _TooBig(f"it makes more than {MADE * _max_size():,} characters of strings and lists in all")


def _bounded(value):
    """`value`, once its size is known to be within the budget (and the time is not up)."""
    _tick()
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > MAX_INT_BITS:
        raise _TooBig(f"it makes a number of more than {MAX_INT_BITS:,} bits")
    _check(_size(value))
    _made(_size(value))
    return value


def _int(value) -> int:
    return value if isinstance(value, int) else 0


def _binop_size(op: str, left, right) -> None:
    """Refuses, before it runs, an operation whose result would be too big."""
    if op == "**" and isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1:
        if left.bit_length() * right > MAX_INT_BITS:
            raise _TooBig(f"it makes a number of more than {MAX_INT_BITS:,} bits")
    elif op == "*":
        if isinstance(left, int) and isinstance(right, int):
            if left.bit_length() + right.bit_length() > MAX_INT_BITS:
                raise _TooBig(f"it makes a number of more than {MAX_INT_BITS:,} bits")
        elif isinstance(right, int) or isinstance(left, int):
            seq, n = (left, right) if isinstance(right, int) else (right, left)
            _check(_size(seq) * max(n, 0), "a repeated string or list")
    elif op == "+":
        _check(_size(left) + _size(right))
    elif op == "%" and isinstance(left, str):
        _check_printf(left, right)


_PRINTF = re.compile(r"%(?:\([^)]*\))?[#0\- +]*(\*|\d+)?(?:\.(\*|\d+))?")


def _check_printf(fmt: str, args) -> None:
    for width, precision in _PRINTF.findall(fmt):
        for n in (width, precision):
            if n == "*" or (n and int(n) > MAX_WIDTH):
                raise _TooBig(f"a printf field width above {MAX_WIDTH:,}")
    _check(len(fmt) + sum(len(str(a)) for a in (args if isinstance(args, tuple) else (args,))), "a formatted string")


def _check_format(fmt: str) -> None:
    """str.format: field widths bounded, no nested fields in a spec (their width would come from data)."""
    try:
        fields = list(string.Formatter().parse(fmt))
    except ValueError:
        return  # format() will say what is wrong
    for _, _, spec, _ in fields:
        if spec and ("{" in spec or any(int(n) > MAX_WIDTH for n in re.findall(r"\d+", spec))):
            raise _TooBig(f"a format field wider than {MAX_WIDTH:,} (or set by a nested field)")


def _join_size(items, sep: str) -> int:
    items = list(items)
    return sum(len(str(x)) for x in items) + len(sep) * max(len(items) - 1, 0)


def _replace_size(s: str, old: str, new: str, count=-1) -> int:
    n = len(s) + 1 if not old else s.count(old)
    if isinstance(count, int) and count >= 0:
        n = min(n, count)
    return len(s) + n * max(len(new) - len(old), 0)


# The str methods whose result can be much bigger than the string: result size before they run.
STR_METHODS = {
    "center": lambda s, width=0, *a: _int(width),
    "ljust": lambda s, width=0, *a: _int(width),
    "rjust": lambda s, width=0, *a: _int(width),
    "zfill": lambda s, width=0: _int(width),
    "expandtabs": lambda s, tabsize=8: len(s) + s.count("\t") * _int(tabsize),
    "replace": lambda s, old="", new="", count=-1: _replace_size(s, str(old), str(new), count),
    "join": lambda s, items=(): _join_size(items, s) if isinstance(items, (list, tuple, str, dict)) else 0,
    "translate": lambda s, table=None: len(s) * (1 + max((_size(v) for v in table.values()), default=0))
    if isinstance(table, dict) else 0,
}


# -- filters: the same checks, before the filter runs ---------------------------------------------------


def _indent_size(s, width=4, *a, **k) -> int:
    lines = str(s).count("\n") + 2
    return len(str(s)) + lines * (len(width) if isinstance(width, str) else _int(width))


def _wordwrap_size(s, width=79, break_long_words=True, wrapstring=None, *a, **k) -> int:
    s = str(s)
    return len(s) + (len(s) // max(_int(width), 1) + 1) * len(str(wrapstring or "\n"))


def _tojson_size(value, indent=None) -> int:
    if indent is not None and (_size(indent) > 16 or (isinstance(indent, int) and indent > 16)):
        raise _TooBig("a JSON indent above 16")
    return 0


# filter name -> the size of its result, from its arguments, before it runs
FILTER_SIZES = {
    "center": lambda value, width=80: _int(width),
    "indent": _indent_size,
    "wordwrap": _wordwrap_size,
    "replace": lambda s, old, new, count=None: _replace_size(str(s), str(old), str(new), -1 if count is None else count),
    "join": lambda value, d="", attribute=None: _join_size(value, str(d)) if isinstance(value, (list, tuple, str)) else 0,
    "tojson": _tojson_size,
    # loops whose length an argument sets, not the input: slices made, and the padding of the last batch
    "slice": lambda value, slices=1, fill_with=None: _int(slices),
    "batch": lambda value, linecount=1, fill_with=None: _int(linecount) if fill_with is not None else 0,
}


def _guarded_filter(name: str, fn):
    from jinja2.utils import _PassArg

    size = FILTER_SIZES.get(name)
    skip = 1 if _PassArg.from_obj(fn) is not None else 0  # the context, eval context or environment comes first

    @functools.wraps(fn)
    def guarded(*args, **kwargs):
        _tick()
        values = args[skip:]
        if size is not None:
            _check(size(*values, **kwargs))
        if name == "format" and values:
            _check_printf(str(values[0]), values[1:])
        return _bounded(fn(*args, **kwargs))

    return guarded


# -- the environment ------------------------------------------------------------------------------------


def _environment():
    from jinja2 import nodes
    from jinja2.compiler import CodeGenerator
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generator(CodeGenerator):
        """`a ~ b` and slices through the environment, so that what they make is counted."""

        def visit_Concat(self, node, frame) -> None:
            self.write("environment.concat((")
            for arg in node.nodes:
                self.visit(arg, frame)
                self.write(", ")
            self.write("))")

        def visit_For(self, node, frame) -> None:
            """Every loop steps through environment.ticking: the clock is checked at each step, even of a
            loop with an empty body over a C-level iterator."""
            node.iter = nodes.Call(nodes.EnvironmentAttribute("ticking", lineno=node.lineno), [node.iter], [], None, None,
                                   lineno=node.lineno)
            super().visit_For(node, frame)

        def visit_Getitem(self, node, frame) -> None:
            if not isinstance(node.arg, nodes.Slice):
                return super().visit_Getitem(node, frame)
            self.write("environment.sliced(")
            self.visit(node.node, frame)
            self.write(", slice(")
            for i, part in enumerate((node.arg.start, node.arg.stop, node.arg.step)):
                self.write(", " if i else "")
                if part is None:
                    self.write("None")
                else:
                    self.visit(part, frame)
            self.write("))")

    class Environment(ImmutableSandboxedEnvironment):
        code_generator_class = Generator
        intercepted_binops = frozenset({"**", "*", "+", "%"})  # the ones that can make something big

        @staticmethod
        def ticking(iterable):
            for item in iterable:
                _tick()
                yield item

        def call_binop(self, context, operator, left, right):
            _tick()
            _binop_size(operator, left, right)
            return _bounded(super().call_binop(context, operator, left, right))

        def call(__self, __context, __obj, *args, **kwargs):  # Jinja's own signature (names that no keyword can clash with)
            _tick()
            target = getattr(__obj, "__wrapped__", __obj)  # str.format comes wrapped by the sandbox
            owner = getattr(target, "__self__", None)
            name = getattr(target, "__name__", "")
            if isinstance(owner, str):
                if name in STR_METHODS:
                    _check(STR_METHODS[name](owner, *args, **kwargs), f"a string (str.{name})")
                elif name in ("format", "format_map"):
                    _check_format(owner)
            return _bounded(super().call(__context, __obj, *args, **kwargs))

        @staticmethod
        def sliced(obj, part: slice):
            value = obj[part]  # a copy: counted
            _made(_size(value))
            return value

        @staticmethod
        def concat(pieces) -> str:
            """`a ~ b`, and the output of macros, blocks and {% set %} blocks (Jinja joins their buffers
            with environment.concat)."""
            _tick()
            pieces = [str(p) for p in pieces]
            size = sum(map(len, pieces))
            _check(size)
            _made(size)
            return "".join(pieces)

    env = Environment(trim_blocks=True, lstrip_blocks=True)  # no loader: include, extends and import fail
    env.filters = {name: _guarded_filter(name, fn) for name, fn in env.filters.items()}
    env.globals.pop("lipsum", None)
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = _strftime_now
    return env


_ENV = None


@contextmanager
def _budget(size: int) -> Iterator[None]:
    """Template code on this thread runs for at most MAX_SECONDS and makes nothing bigger than `size`."""
    previous = {k: getattr(_limit, k) for k in ("size", "made", "deadline") if hasattr(_limit, k)}
    _limit.size, _limit.made, _limit.deadline = size, 0, time.monotonic() + MAX_SECONDS
    try:
        yield
    finally:
        for k in ("size", "made", "deadline"):
            if k in previous:
                setattr(_limit, k, previous[k])
            elif hasattr(_limit, k):
                delattr(_limit, k)


def _reason(e: BaseException) -> str:
    """One line saying what went wrong, with the template's own words where it raised on purpose."""
    if isinstance(e, _OverBudget):
        return f"it ran for more than {MAX_SECONDS:g} s"
    if isinstance(e, RecursionError):
        return "it recurses too deeply"
    if isinstance(e, MemoryError):
        return "it ran out of memory"
    if isinstance(e, _Raised):
        return f"it rejected the conversation: {shown(e)}"
    if isinstance(e, _TooBig):
        return shown(e)
    message = str(e)
    return shown(f"{type(e).__name__}: {message}" if message else type(e).__name__)


@lru_cache(maxsize=8)
def _compiled(source: str):
    global _ENV
    if _ENV is None:
        _ENV = _environment()
    with _budget(MAX_SIZE):
        return _ENV.from_string(source)


def compile_template(source: str | None):
    """The template, compiled in the sandbox; TemplateError when it does not compile."""
    if isinstance(source, str) and len(source) > MAX_TEMPLATE:
        raise TemplateError(f"{PREFIX}it is {len(source):,} characters long (at most {MAX_TEMPLATE:,})")
    try:
        return _compiled(source or CHATML)
    except (Exception, _OverBudget) as e:  # noqa: BLE001 - the template is the model file's code: any failure is the file's
        raise TemplateError(f"{PREFIX}it does not compile: {_reason(e)}") from None


def _run(template, messages: list[dict], kw: dict) -> str:
    """One render under the limits; the template's own exceptions propagate, the rest is TemplateError."""
    data = sum(len(m.get("content") or "") for m in messages)
    size = MAX_SIZE + 4 * data
    out, total = [], 0
    try:
        with _budget(size):
            for piece in template.generate(messages=messages, **kw):
                _tick()
                total += len(piece)
                if total > size:
                    raise _TooBig(f"its output is longer than {size:,} characters")
                out.append(piece)
    except (_OverBudget, _TooBig, RecursionError, MemoryError) as e:
        raise TemplateError(PREFIX + _reason(e)) from None
    return "".join(out)


def fold_system(messages: list[dict]) -> list[dict]:
    """The system prompt as the start of the first user message (Mistral's own convention)."""
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    rest = [dict(m) for m in messages if m["role"] != "system"]
    if system:
        for m in rest:
            if m["role"] == "user":
                m["content"] = f"{system}\n\n{m['content']}"
                break
        else:
            rest.insert(0, {"role": "user", "content": system})
    return rest


def _forms(messages: list[dict]) -> Iterator[list[dict]]:
    """The conversation as given, then as stricter templates want it: the system prompt folded into the
    first user turn, then also without assistant turns before the first user turn."""
    yield messages
    folded = fold_system(messages)
    if folded != messages:
        yield folded
    first_user = next((i for i, m in enumerate(folded) if m["role"] == "user"), 0)
    if first_user:
        yield folded[first_user:]


def _render(source: str | None, messages: list[dict], kw: dict) -> tuple[object, list[dict], str]:
    template = compile_template(source)
    first = None
    for form in _forms(messages):
        try:
            return template, form, _run(template, form, kw)
        except TemplateError:
            raise
        except Exception as e:  # noqa: BLE001 - the template is the model file's code
            first = first or e
    raise TemplateError(PREFIX + _reason(first)) from None


def render(source: str | None, messages: list[dict], *, bos: str = "", eos: str = "", generation_prompt: bool = True) -> str:
    """The conversation as the template writes it; TemplateError (one line) for anything that goes wrong."""
    kw = dict(bos_token=bos, eos_token=eos, add_generation_prompt=generation_prompt)
    return _render(source, messages, kw)[2]


# -- which parts of the text are data -------------------------------------------------------------------


def _markers(source: str, messages: list[dict], bos: str, eos: str) -> tuple[str, str] | None:
    """Two private-use characters found nowhere in the template or the conversation."""
    used = set(source) | set(bos) | set(eos) | {c for m in messages for c in m.get("content") or ""}
    free = (chr(c) for c in range(0xE000, 0xF900) if chr(c) not in used)
    pair = (next(free, None), next(free, None))
    return pair if None not in pair else None


def _marked(content: str, opening: str, closing: str) -> str:
    """Content between markers, its outer whitespace outside them (so `|trim` acts as on the content)."""
    core = content.strip()
    if not core:
        return content
    start = content.index(core)
    return f"{content[:start]}{opening}{core}{closing}{content[start + len(core):]}"


def _spans(text: str, opening: str, closing: str) -> list[tuple[str, bool]] | None:
    """(piece, is data) in order, or None when the markers do not pair up."""
    out: list[tuple[str, bool]] = []
    for i, part in enumerate(text.split(opening)):
        if i == 0:
            if closing in part:
                return None
            out.append((part, False))
            continue
        inside = part.split(closing)
        if len(inside) != 2:
            return None
        out += [(inside[0], True), (inside[1], False)]
    return [s for s in out if s[0]]


def render_marked(source: str | None, messages: list[dict], *, bos: str = "", eos: str = "", generation_prompt: bool = True
                  ) -> tuple[str, list[tuple[str, bool]] | None]:
    """The text, and its pieces as (text, is content) when the content can be told apart from the
    template's markup: None when the template changes content beyond trimming it."""
    kw = dict(bos_token=bos, eos_token=eos, add_generation_prompt=generation_prompt)
    template, form, text = _render(source, messages, kw)
    markers = _markers(source or CHATML, form, bos, eos)
    if markers is None:
        return text, None
    marked = [{**m, "content": _marked(m["content"], *markers)} if isinstance(m.get("content"), str) else m for m in form]
    try:
        spans = _spans(_run(template, marked, kw), *markers)
    except Exception:  # noqa: BLE001 - the template behaves differently on marked content: no spans
        return text, None
    if spans is None or "".join(s for s, _ in spans) != text:
        return text, None
    return text, spans
