"""The call-and-answer loop and a conversation turn (localmix.reply), run for real on a scripted backend
(at the edge: it stands in for llama.cpp). The same loop on real models: test_commands_run.py."""

import pytest

from localmix.backends import Done, Sampling, Text, ToolCalls, ToolResult, Trimmed
from localmix.errors import ToolCallError
from localmix.reply import reply
from localmix.tools import ToolSet, from_function, tool
from localmix.tools.loop import REFUSED, run_tools
from tests.support.fake_backend import FakeBackend, ToolCallingBackend

ASK = [{"role": "user", "content": "remember milk"}]


def note_tools(saved: list):
    @tool(side_effects=True)
    def save_note(text: str) -> str:
        """Save a note."""
        saved.append(text)
        return "saved"

    return ToolSet([from_function(save_note)])


@pytest.mark.parametrize("allow", [True, False])
def test_calls_results_and_the_answer_as_events(allow):
    saved, asked = [], []
    events = list(run_tools(ToolCallingBackend(), ASK, note_tools(saved), Sampling(),
                            confirm=lambda call: asked.append(call) or allow))
    kinds = [type(e) for e in events]
    assert kinds[0] is Text and ToolCalls in kinds and kinds[-1] is Done  # the call streamed, then was recognised
    calls = next(e for e in events if isinstance(e, ToolCalls)).calls
    assert [c["name"] for c in calls] == ["save_note"] and calls[0]["arguments"] == {"text": "buy milk"}
    [result] = [e for e in events if isinstance(e, ToolResult)]
    assert result.result == ("saved" if allow else REFUSED) and saved == (["buy milk"] if allow else [])
    assert len(asked) == 1
    answer = "".join(e.text for e in events[kinds.index(ToolResult):] if isinstance(e, Text))
    assert answer == f"Done: {result.result}"


class AlwaysCalls(ToolCallingBackend):
    def words(self, prompt):
        return ['{"tool_calls": [{"name": "save_note", "arguments": {"text": "again"}}]}']


def test_a_model_that_never_answers_is_stopped():
    with pytest.raises(ToolCallError, match="after 3 rounds"):
        list(run_tools(AlwaysCalls(), ASK, note_tools([]), Sampling(), confirm=lambda c: True, max_rounds=3))


def test_unknown_tool_choice():
    with pytest.raises(ToolCallError, match="--tool-choice nope: no such tool"):
        list(run_tools(FakeBackend(), ASK, note_tools([]), Sampling(), choice="nope"))


def test_a_forced_call_that_is_not_a_call():
    with pytest.raises(ToolCallError, match="did not call a tool"):
        list(run_tools(FakeBackend(), ASK, note_tools([]), Sampling(), choice="save_note"))


def test_reply_without_tools_trims_to_the_context():
    b = FakeBackend(ctx=200)
    msgs = [{"role": "system", "content": "Stay calm."}]
    for i in range(8):
        msgs += [{"role": "user", "content": f"question {i} " + "word " * 10}, {"role": "assistant", "content": "ok " * 10}]
    msgs.append({"role": "user", "content": "last one"})
    events = list(reply(b, msgs, Sampling(max_tokens=40), fit=True))
    assert isinstance(events[0], Trimmed) and events[0].dropped > 0
    assert isinstance(events[-1], Done) and "".join(e.text for e in events if isinstance(e, Text)) == "reply 1 to last one"
    assert b.prompt_tokens[-1] <= 200 - 40 and "Stay calm." in b.seen[-1] and "question 0" not in b.seen[-1]
    untrimmed = list(reply(FakeBackend(ctx=200), msgs, Sampling(max_tokens=40)))
    assert not any(isinstance(e, Trimmed) for e in untrimmed)


def test_reply_with_tools_counts_them_when_trimming():
    b = ToolCallingBackend(ctx=400)
    msgs = []
    for i in range(6):
        msgs += [{"role": "user", "content": f"question {i} " + "word " * 10}, {"role": "assistant", "content": "ok " * 10}]
    msgs.append({"role": "user", "content": "remember milk"})
    events = list(reply(b, msgs, Sampling(max_tokens=40), toolset=note_tools([]), confirm=lambda c: True, fit=True))
    assert isinstance(events[0], Trimmed)
    assert b.prompt_tokens[0] <= 400 - 40  # the first round's prompt, tool specifications included
    assert next(e for e in events if isinstance(e, ToolResult)).result == "saved"
    # without the tools the same conversation fits: it is the specifications that pushed turns out
    assert not any(isinstance(e, Trimmed) for e in reply(FakeBackend(ctx=400), msgs, Sampling(max_tokens=40), fit=True))
