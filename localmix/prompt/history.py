"""A conversation made presentable to a chat template, whatever happened to it: after a crash a chat can
hold two user messages in a row (the reply to the first was never saved) or an empty assistant reply,
and strict templates (Mixtral's: "Conversation roles must alternate") raise on such a history. Repaired
here, before any template sees it, so that no history can break a chat."""

from __future__ import annotations

from ..errors import LocalmixError
from ..text import shown

ROLES = ("system", "user", "assistant", "tool")
MERGED = ("system", "user", "assistant")  # consecutive messages of these roles become one; tool results stay apart


def content_text(value) -> str:
    """A message's content as text: None is empty, a list of parts (OpenAI's form) is their text."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in value)
    return str(value)


def _mergeable(a: dict, b: dict) -> bool:
    return a["role"] == b["role"] and a["role"] in MERGED and not a.get("tool_calls") and not b.get("tool_calls")


def repair(messages: list[dict]) -> list[dict]:
    """The conversation with text contents, no empty assistant replies (one cut off before its first
    word says nothing), and consecutive messages of one role merged into one (their texts joined by a
    blank line). Messages are copied, never changed in place."""
    out: list[dict] = []
    for m in messages:
        role = m.get("role") if isinstance(m, dict) else None
        if role not in ROLES:
            raise LocalmixError(f"a message has an unknown role {shown(role)} (expected one of {', '.join(ROLES)})")
        m = {**m, "content": content_text(m.get("content"))}
        if role == "assistant" and not m.get("tool_calls") and not m["content"].strip():
            continue
        if out and _mergeable(out[-1], m):
            out[-1]["content"] = "\n\n".join(t for t in (out[-1]["content"], m["content"]) if t)
        else:
            out.append(m)
    return out
