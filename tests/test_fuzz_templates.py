"""Hostile chat templates (tests/fuzz/templates.py): every one renders or fails with one line, quickly,
and no sandbox escape reads a file or the environment. First the renderer alone (pure Python, with a
short time budget), then `localmix run` on real GGUFs holding them, through the fork-server harness."""

import time

import pytest

from localmix.errors import TemplateError
from localmix.prompt import template
from localmix.prompt.template import render
from tests.fuzz.harness import Harness, failures, leftovers
from tests.fuzz.templates import ESCAPES, HOSTILE, SECRET, SECRET_ENV, cases, secret_leaked, templates

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "<|im_end|>[INST] </s>"}]


@pytest.fixture
def secret_here(tmp_path, monkeypatch):
    """A secret in the working folder and in the environment, and a short time budget."""
    (tmp_path / "SECRET.txt").write_text(SECRET)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(SECRET_ENV, SECRET)
    monkeypatch.setattr(template, "MAX_SECONDS", 0.3)


def rendered_or_why(source: str) -> tuple[str | None, str | None]:
    try:
        return render(source, MESSAGES, bos="<s>", eos="</s>"), None
    except TemplateError as e:
        return None, str(e)


@pytest.mark.parametrize("label, source", templates(seed=0, n=len(ESCAPES) + len(HOSTILE) + 150))
def test_the_renderer_gives_a_prompt_or_one_line(label, source, secret_here):
    t0 = time.monotonic()
    text, why = rendered_or_why(source)
    assert time.monotonic() - t0 < 3, f"{label}: took {time.monotonic() - t0:.1f} s"
    if why is not None:
        assert why.startswith("the model's chat template failed: ") and "\n" not in why and len(why) < 400, why
    else:
        assert len(text) <= template.MAX_SIZE + 4 * sum(len(m["content"]) for m in MESSAGES)
    assert SECRET not in (text or "") + (why or "")


@pytest.mark.parametrize("label", ["power tower", "power in a loop", "string times huge", "doubling concat", "center filter",
                                   "printf width", "format width", "join of big", "tojson indent", "slice huge", "batch padding",
                                   "slices kept", "many medium strings", "macro output", "set block"])
def test_huge_values_are_refused_before_they_are_made(label, secret_here):
    """Each of these is one C-level operation the time budget could not stop (or many, each within the
    size budget, kept until they fill the memory): refused by size, before the memory is taken."""
    import tracemalloc

    tracemalloc.start()
    try:
        t0 = time.monotonic()
        _, why = rendered_or_why(HOSTILE[label])
        seconds, peak = time.monotonic() - t0, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert why and "ran for more than" not in why and seconds < 3, why
    assert peak < 100_000_000, f"{peak / 1e6:.0f} MB at the peak"


@pytest.mark.parametrize("label, reason", [
    ("nested loops", "ran for more than"), ("binary recursion", "ran for more than"), ("recursion", "recurses too deeply"),
    ("empty loops over lists", "ran for more than"), ("call loop", "ran for more than"),
    ("include", "no loader"), ("extends", "no loader"), ("import", "no loader"), ("syntax error", "does not compile"),
    ("deep parentheses", "does not compile"), ("division by zero", "ZeroDivisionError"), ("huge output", "output is longer"),
    ("raise_exception", "rejected the conversation: no conversations today"), ("undefined", "UndefinedError"),
    ("raise_exception multiline", "line one\\x0aline two\\x1b[2J"),
])
def test_each_failure_says_what_went_wrong(label, reason, secret_here):
    _, why = rendered_or_why(HOSTILE[label])
    assert why and reason in why, why


def test_the_budgets_reset_after_a_render(secret_here):
    """A failed render leaves no deadline and no size limit behind on the thread."""
    rendered_or_why(HOSTILE["nested loops"])
    rendered_or_why(HOSTILE["string times huge"])
    assert not hasattr(template._limit, "deadline") and not hasattr(template._limit, "size")
    assert "x" * 2_000_000 == "x" * 2_000_000  # plain Python is untouched
    assert render(None, [{"role": "user", "content": "y" * 3_000_000}]).count("y") == 3_000_000


def test_run_on_models_with_hostile_templates(tmp_path, monkeypatch):
    """`localmix run` on real GGUFs carrying each named template and random ones: success or one line,
    no hang, no signal, no file left, no secret printed (--print-prompt prints the rendered prompt)."""
    from localmix.hardware import detect

    monkeypatch.setenv(SECRET_ENV, SECRET)
    detect()  # the bandwidth probes once, before the forks (each `run` would probe otherwise)
    all_cases = cases(seed=1, n=len(ESCAPES) + len(HOSTILE) + 60, workdir=tmp_path, timeout=30.0)
    with Harness() as h:
        outcomes = h.run(all_cases)
    assert all(o.ok for o in outcomes), failures(outcomes)
    assert not [o.describe() for o in outcomes if secret_leaked(o)]
    assert not leftovers(outcomes)
    assert any(o.code == 0 for o in outcomes) and any(o.code == 1 for o in outcomes)
    slow = [o.describe() for o in outcomes if o.seconds > 2 * template.MAX_SECONDS + 10]
    assert not slow
