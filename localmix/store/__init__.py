"""Conversations in SQLite (WAL) in the user's data folder. The schema is versioned: MIGRATIONS[i]
takes the database from version i to i + 1 (PRAGMA user_version), run once, in order, on open, in one
transaction that takes the write lock first: two processes opening a fresh folder together both open it.

A reply being written is a Draft: saved as it grows (marked incomplete) at most every SAVE_EVERY
seconds, so a crash or a power loss keeps what was shown; finishing it marks it complete."""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import LocalmixError

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
    # 3: replies saved while they are written; 0 until finished (one left at 0 was cut off by a crash)
    """
    ALTER TABLE messages ADD COLUMN complete INTEGER NOT NULL DEFAULT 1;
    """,
]
LOCK_WAIT = 30.0  # seconds a connection waits for another process's write (a migration, a save)
SAVE_EVERY = 0.5  # seconds between saves of a reply being written

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
    complete: bool = True  # False: a reply being written, or one cut off (the app stopped while writing it)

    def as_prompt(self) -> dict:
        m = {"role": self.role, "content": self.content}
        if self.tool_calls:
            m["tool_calls"] = self.tool_calls
        if self.role == "tool":
            m.update(tool_call_id=self.tool_call_id, name=self.name)
        return m


def statements(script: str) -> list[str]:
    """A migration script as its statements (sqlite3's own test for a complete statement, so a `;` in a
    string or a trigger body does not split one)."""
    out, current = [], ""
    for line in script.splitlines(keepends=True):
        current += line
        if sqlite3.complete_statement(current):
            out.append(current.strip())
            current = ""
    return out + ([current.strip()] if current.strip() else [])


class Store:
    def __init__(self, path: Path):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(path, timeout=LOCK_WAIT, check_same_thread=False, isolation_level=None)
            self.db.row_factory = sqlite3.Row
            self._wal()
            self.db.execute("PRAGMA foreign_keys=ON")
            self._migrate()
        except (OSError, sqlite3.Error) as e:
            from ..text import shown

            raise LocalmixError(f"cannot open the chats database {shown(path)}: {shown(e)}") from None

    def _wal(self) -> None:
        """Switch a fresh database to WAL (the mode stays in the file). SQLite answers "locked" at once,
        without waiting, while another connection makes the same switch: wait here instead."""
        end = time.monotonic() + LOCK_WAIT
        while True:
            try:
                self.db.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) or time.monotonic() > end:
                    raise
                time.sleep(0.01)

    def _migrate(self) -> None:
        """Every migration not yet run, in one transaction. BEGIN IMMEDIATE takes the write lock before
        the version is read, so a second process waits (LOCK_WAIT) and then finds the work done."""
        if self.version == len(MIGRATIONS):
            return
        self.db.execute("BEGIN IMMEDIATE")
        try:
            version = self.version
            if version > len(MIGRATIONS):
                raise LocalmixError(f"the chats database is from a newer localmix (schema {version}, this one knows "
                                    f"{len(MIGRATIONS)})")
            for i, script in enumerate(MIGRATIONS[version:], start=version):
                for statement in statements(script):
                    self.db.execute(statement)
                self.db.execute(f"PRAGMA user_version = {i + 1}")
            self.db.execute("COMMIT")
        except BaseException:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            raise

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
                    tool_calls: list | None = None, tool_call_id: str | None = None, name: str | None = None,
                    complete: bool = True) -> Message:
        now = time.time()
        cur = self.db.execute(
            "INSERT INTO messages (chat_id, role, content, stats, created, tool_calls, tool_call_id, name, complete)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (chat_id, role, content, json.dumps(stats) if stats else None, now,
             json.dumps(tool_calls) if tool_calls else None, tool_call_id, name, int(complete)),
        )
        self._touch(chat_id)
        return Message(cur.lastrowid, chat_id, role, content, stats, now, tool_calls, tool_call_id, name, complete)

    def update_message(self, message_id: int, content: str, stats: dict | None = None, *, complete: bool) -> None:
        self.db.execute("UPDATE messages SET content = ?, stats = ?, complete = ? WHERE id = ?",
                        (content, json.dumps(stats) if stats else None, int(complete), message_id))

    def delete_message(self, message_id: int) -> None:
        self.db.execute("DELETE FROM messages WHERE id = ?", (message_id,))

    def messages(self, chat_id: int) -> list[Message]:
        rows = self.db.execute("SELECT * FROM messages WHERE chat_id = ? ORDER BY id", (chat_id,))
        return [Message(r["id"], r["chat_id"], r["role"], r["content"], _json(r["stats"]), r["created"],
                        _json(r["tool_calls"]), r["tool_call_id"], r["name"], bool(r["complete"]))
                for r in rows]

    def draft(self, chat_id: int, every: float = SAVE_EVERY) -> Draft:
        return Draft(self, chat_id, every)

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
                cut = "" if m.complete else "\n*(cut off)*\n"
                parts.append(f"## {m.role.capitalize()}\n\n{m.content}\n{cut}")
        return "\n".join(parts)


def _json(value: str | None):
    """A JSON column: None when empty, and None when unreadable (a damaged row still opens)."""
    if not value:
        return None
    try:
        return json.loads(value)
    except ValueError:
        return None


class Draft:
    """An assistant reply being written, saved as it grows: `update(text)` with the whole text so far
    writes it (marked incomplete) when SAVE_EVERY seconds have passed since the last save; `finish`
    writes the end marked complete, or marks it cut off. No row exists until there is text."""

    def __init__(self, store: Store, chat_id: int, every: float = SAVE_EVERY):
        self.store, self.chat_id, self.every = store, chat_id, every
        self.message_id: int | None = None
        self.saved = ""
        self._due = 0.0

    def update(self, text: str, *, force: bool = False) -> None:
        now = time.monotonic()
        if text != self.saved and (now >= self._due or force):
            self._save(text, None, complete=False)
            self._due = now + self.every

    def finish(self, text: str, stats: dict | None = None, *, complete: bool = True) -> int | None:
        """The final text (complete, or cut off by an error); an empty reply leaves no row. The message id."""
        if not text:
            self.discard()
            return None
        self._save(text, stats, complete=complete)
        return self.message_id

    def discard(self) -> None:
        """Forget what was saved (the text turned out to be a tool call); the next update starts a new row."""
        if self.message_id is not None:
            self.store.delete_message(self.message_id)
        self.message_id, self.saved, self._due = None, "", 0.0

    def _save(self, text: str, stats: dict | None, *, complete: bool) -> None:
        if self.message_id is None:
            self.message_id = self.store.add_message(self.chat_id, "assistant", text, stats, complete=complete).id
        else:
            self.store.update_message(self.message_id, text, stats, complete=complete)
        self.saved = text


def default_path() -> Path:
    from ..paths import home

    return home() / "chats.sqlite3"
