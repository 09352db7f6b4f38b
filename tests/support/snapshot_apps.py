"""Apps for the snapshot tests: the chat app with a scripted backend and a fixed conversation."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from test_chat_app import FakeBackend  # noqa: E402

from localmix.app.chat import ChatApp  # noqa: E402
from localmix.store import Store  # noqa: E402


def chat_app() -> ChatApp:
    store = Store(Path(tempfile.mkdtemp()) / "chats.sqlite3")
    chat = store.new_chat(title="Capitals")
    store.add_message(chat.id, "user", "What is the capital of France?")
    store.add_message(chat.id, "assistant", "The capital of France is **Paris**.\n\n```python\nprint('Paris')\n```")
    return ChatApp(lambda progress, path: (FakeBackend(), {"split": "45%/55% CPU/GPU", "summary": "fake"}), store,
                   "mixtral-8x7b-instruct-Q4_K_M")


app = chat_app()
