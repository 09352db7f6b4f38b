"""The app for the snapshot tests (tests/test_app_snapshots.py): the chat app with a scripted backend
and a fixed conversation."""

from __future__ import annotations

import tempfile
from pathlib import Path

from localmix.app.chat import ChatApp
from localmix.store import Store
from tests.support.fake_backend import FakeBackend


def chat_app() -> ChatApp:
    store = Store(Path(tempfile.mkdtemp()) / "chats.sqlite3")
    chat = store.new_chat(title="Capitals")
    store.add_message(chat.id, "user", "What is the capital of France?")
    store.add_message(chat.id, "assistant", "The capital of France is **Paris**.\n\n```python\nprint('Paris')\n```")
    return ChatApp(lambda progress, path: (FakeBackend(), {"split": "45%/55% CPU/GPU", "summary": "fake"}), store,
                   "mixtral-8x7b-instruct-Q4_K_M")


app = chat_app()
