"""Conversations in SQLite (WAL) in the user's data folder. The schema is versioned: MIGRATIONS[i]
takes the database from version i to i + 1 (PRAGMA user_version), run once, in order, on open."""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

MIGRATIONS = [
    """
    CREATE TABLE chats (
        id INTEGER PRIMARY KEY,
        title TEXT NOT NULL,
        model TEXT NOT NULL DEFAULT '',
        system TEXT NOT NULL DEFAULT '',
        temperature REAL NOT NULL DEFAULT 0.7,
        top_p REAL NOT NULL DEFAULT 0.95,
        max_tokens INTEGER NOT NULL DEFAULT 1024,
        seed INTEGER,
        created REAL NOT NULL,
        updated REAL NOT NULL
    );
    CREATE TABLE messages (
        id INTEGER PRIMARY KEY,
        chat_id INTEGER NOT NULL REFERENCES chats(id) ON DELETE CASCADE,
        role TEXT NOT NULL CHECK (role IN ('system', 'user', 'assistant')),
        content TEXT NOT NULL,
        stats TEXT,
        created REAL NOT NULL
    );
    CREATE INDEX messages_by_chat ON messages(chat_id, id);
    """,
    # 2: tool calls. SQLite cannot change a CHECK constraint in place: the table is rebuilt.
    """
    CREATE TABLE messages_v2 (
        id INTEGER PRIMARY KEY,
        chat_id INTEGER NOT NULL REFERENCES chats(id) ON DELETE CASCADE,
        role TEXT NOT NULL CHECK (role IN ('system', 'user', 'assistant', 'tool')),
        content TEXT NOT NULL,
        stats TEXT,
        created REAL NOT NULL,
        tool_calls TEXT,
        tool_call_id TEXT,
        name TEXT
    );
    INSERT INTO messages_v2 (id, chat_id, role, content, stats, created)
        SELECT id, chat_id, role, content, stats, created FROM messages;
    DROP TABLE messages;
    ALTER TABLE messages_v2 RENAME TO messages;
    CREATE INDEX messages_by_chat ON messages(chat_id, id);
    """,
]

SETTINGS = ("system", "temperature", "top_p", "max_tokens", "seed")


@dataclass
class Chat:
    id: int
    title: str
    model: str
    system: str
    temperature: float
    top_p: float
    max_tokens: int
    seed: int | None
    created: float
    updated: float


@dataclass
class Message:
    id: int
    chat_id: int
    role: str
    content: str
    stats: dict | None
    created: float
    tool_calls: list | None = None  # assistant: [{"id", "name", "arguments"}]
    tool_call_id: str | None = None  # tool: the call it answers
    name: str | None = None  # tool: its name

    def as_prompt(self) -> dict:
        m = {"role": self.role, "content": self.content}
        if self.tool_calls:
            m["tool_calls"] = self.tool_calls
        if self.role == "tool":
            m.update(tool_call_id=self.tool_call_id, name=self.name)
        return m


class Store:
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA foreign_keys=ON")
        self._migrate()

    def _migrate(self) -> None:
        version = self.db.execute("PRAGMA user_version").fetchone()[0]
        for i, script in enumerate(MIGRATIONS[version:], start=version):
            self.db.executescript(f"BEGIN; {script}; PRAGMA user_version = {i + 1}; COMMIT;")

    @property
    def version(self) -> int:
        return self.db.execute("PRAGMA user_version").fetchone()[0]

    def close(self) -> None:
        self.db.close()

    # chats
    def new_chat(self, title: str = "New chat", model: str = "", **settings) -> Chat:
        now = time.time()
        cols = {"title": title, "model": model, "created": now, "updated": now}
        cols.update({k: v for k, v in settings.items() if k in SETTINGS and v is not None})
        cur = self.db.execute(
            f"INSERT INTO chats ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})", tuple(cols.values())
        )
        return self.chat(cur.lastrowid)

    def chat(self, chat_id: int) -> Chat | None:
        row = self.db.execute("SELECT * FROM chats WHERE id = ?", (chat_id,)).fetchone()
        return Chat(**row) if row else None

    def chats(self) -> list[Chat]:
        return [Chat(**r) for r in self.db.execute("SELECT * FROM chats ORDER BY updated DESC, id DESC")]

    def last_chat(self) -> Chat | None:
        chats = self.chats()
        return chats[0] if chats else None

    def rename(self, chat_id: int, title: str) -> None:
        self.db.execute("UPDATE chats SET title = ? WHERE id = ?", (title, chat_id))

    def update_settings(self, chat_id: int, **settings) -> None:
        for key, value in settings.items():
            if key not in SETTINGS:
                raise KeyError(key)
            self.db.execute(f"UPDATE chats SET {key} = ? WHERE id = ?", (value, chat_id))

    def delete_chat(self, chat_id: int) -> None:
        self.db.execute("DELETE FROM chats WHERE id = ?", (chat_id,))

    def _touch(self, chat_id: int) -> None:
        self.db.execute("UPDATE chats SET updated = ? WHERE id = ?", (time.time(), chat_id))

    # messages
    def add_message(self, chat_id: int, role: str, content: str, stats: dict | None = None, *,
                    tool_calls: list | None = None, tool_call_id: str | None = None, name: str | None = None) -> Message:
        now = time.time()
        cur = self.db.execute(
            "INSERT INTO messages (chat_id, role, content, stats, created, tool_calls, tool_call_id, name)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (chat_id, role, content, json.dumps(stats) if stats else None, now,
             json.dumps(tool_calls) if tool_calls else None, tool_call_id, name),
        )
        self._touch(chat_id)
        return Message(cur.lastrowid, chat_id, role, content, stats, now, tool_calls, tool_call_id, name)

    def delete_message(self, message_id: int) -> None:
        self.db.execute("DELETE FROM messages WHERE id = ?", (message_id,))

    def messages(self, chat_id: int) -> list[Message]:
        rows = self.db.execute("SELECT * FROM messages WHERE chat_id = ? ORDER BY id", (chat_id,))
        return [Message(r["id"], r["chat_id"], r["role"], r["content"], json.loads(r["stats"]) if r["stats"] else None,
                        r["created"], json.loads(r["tool_calls"]) if r["tool_calls"] else None, r["tool_call_id"], r["name"])
                for r in rows]

    def export_markdown(self, chat_id: int) -> str:
        chat = self.chat(chat_id)
        parts = [f"# {chat.title}\n"]
        if chat.system:
            parts.append(f"**System:** {chat.system}\n")
        for m in self.messages(chat_id):
            if m.tool_calls:
                calls = "\n".join(f"- `{c['name']}({json.dumps(c['arguments'], ensure_ascii=False)})`" for c in m.tool_calls)
                parts.append(f"## Assistant (tool calls)\n\n{calls}\n")
            elif m.role == "tool":
                parts.append(f"## Tool result ({m.name})\n\n```\n{m.content}\n```\n")
            else:
                parts.append(f"## {m.role.capitalize()}\n\n{m.content}\n")
        return "\n".join(parts)


def default_path() -> Path:
    from ..paths import home

    return home() / "chats.sqlite3"
