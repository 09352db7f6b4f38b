"""The chats store: versioned migrations (also run by two processes at once on a fresh folder), replies
saved while they are written (drafts), and databases it cannot use refused in one line."""

from __future__ import annotations

import multiprocessing
import sqlite3
import time

import pytest

from localmix.errors import LocalmixError
from localmix.store import MIGRATIONS, Store

TRIES = 20


def _open_together(folder, barrier, results) -> None:
    """One process: open each fresh database the moment the other process does too."""
    for i in range(TRIES):
        barrier.wait()
        try:
            store = Store(folder / f"{i}.sqlite3")
            store.new_chat(title=f"try {i}")
            store.close()
            results.put((i, "ok"))
        except Exception as e:  # noqa: BLE001 - reported to the test, which names it
            results.put((i, f"{type(e).__name__}: {e}"))


def test_two_processes_open_a_fresh_database_together(tmp_path):
    """Two `chat`s started together on a fresh folder both open (was: `table chats already exists`)."""
    ctx = multiprocessing.get_context("fork")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_open_together, args=(tmp_path, barrier, results)) for _ in range(2)]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=120) for _ in range(2 * TRIES)]
    for p in procs:
        p.join(timeout=30)
    failures = [o for o in outcomes if o[1] != "ok"]
    assert failures == [], f"{len(failures)} of {2 * TRIES} opens failed: {failures[:3]}"
    for i in range(TRIES):
        store = Store(tmp_path / f"{i}.sqlite3")
        assert store.version == len(MIGRATIONS) and len(store.chats()) == 2
        store.close()


def test_a_version_1_database_is_migrated_and_keeps_its_messages(tmp_path):
    path = tmp_path / "chats.sqlite3"
    db = sqlite3.connect(path)
    db.executescript(MIGRATIONS[0] + "; PRAGMA user_version = 1;")
    db.execute("INSERT INTO chats (id, title, created, updated) VALUES (1, 'old', 0, 0)")
    db.execute("INSERT INTO messages (chat_id, role, content, created) VALUES (1, 'user', 'hi', 0)")
    db.commit()
    db.close()
    store = Store(path)
    assert store.version == len(MIGRATIONS)
    [m] = store.messages(1)
    assert (m.role, m.content, m.complete) == ("user", "hi", True)


def test_a_draft_is_saved_as_it_grows_and_marked_complete_at_the_end(tmp_path):
    store = Store(tmp_path / "chats.sqlite3")
    chat = store.new_chat()
    store.add_message(chat.id, "user", "hi")
    draft = store.draft(chat.id, every=0.05)
    draft.update("")  # nothing yet: no row
    assert [m.role for m in store.messages(chat.id)] == ["user"]
    draft.update("Once")
    assert store.messages(chat.id)[-1].content == "Once" and not store.messages(chat.id)[-1].complete
    draft.update("Once upon")  # within `every` of the last save: not written yet
    assert store.messages(chat.id)[-1].content == "Once"
    time.sleep(0.06)
    draft.update("Once upon a time")
    # another connection (another process after a crash) sees it
    other = Store(tmp_path / "chats.sqlite3")
    last = other.messages(chat.id)[-1]
    assert (last.role, last.content, last.complete) == ("assistant", "Once upon a time", False)
    assert "Once upon a time\n\n*(cut off)*" in other.export_markdown(chat.id)
    draft.finish("Once upon a time, the end.", {"stop": "eos"})
    last = other.messages(chat.id)[-1]
    assert (last.content, last.complete, last.stats) == ("Once upon a time, the end.", True, {"stop": "eos"})
    assert len(other.messages(chat.id)) == 2


def test_a_discarded_draft_leaves_no_row_and_an_empty_one_none(tmp_path):
    store = Store(tmp_path / "chats.sqlite3")
    chat = store.new_chat()
    draft = store.draft(chat.id)
    draft.update('{"tool_calls": [')
    draft.discard()
    assert store.messages(chat.id) == []
    assert draft.finish("") is None and store.messages(chat.id) == []


@pytest.mark.parametrize("setup, says", [
    (lambda p: p.write_bytes(b"not a database, just some bytes" * 100), "not a database"),
    (lambda p: (p.parent / "folder").write_text("a file where the folder should be"), "chats database"),
    (lambda p: (sqlite3.connect(p).execute("PRAGMA user_version = 99").connection.commit()), "newer localmix"),
])
def test_a_database_it_cannot_use_is_one_line(tmp_path, setup, says):
    path = tmp_path / "chats.sqlite3"
    setup(path)
    target = tmp_path / "folder" / "chats.sqlite3" if says == "chats database" else path
    with pytest.raises(LocalmixError, match=says) as e:
        Store(target)
    assert "\n" not in str(e.value)
