"""`localmix chat` in a real terminal: tmux runs it, we type a question, wait for the answer, quit,
reopen, and find the conversation again."""

import os
import shlex
import shutil
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")


SOCKET = f"localmix-test-{os.getpid()}"  # a tmux server of our own, whatever the user runs


def tmux(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(["tmux", "-L", SOCKET, *args], **kw)


def screen(session: str) -> str:
    return tmux("capture-pane", "-p", "-t", session, capture_output=True, text=True).stdout


def wait_for(session: str, text: str, timeout: float = 120) -> str:
    end = time.time() + timeout
    while time.time() < end:
        shown = screen(session)
        if text in shown:
            return shown
        time.sleep(0.25)
    raise AssertionError(f"{text!r} never appeared on screen:\n{screen(session)}")


def last_reply(db) -> str:
    import sqlite3

    con = sqlite3.connect(db)
    try:
        return con.execute("SELECT content FROM messages WHERE role = 'assistant' ORDER BY id DESC LIMIT 1").fetchone()[0]
    finally:
        con.close()


def last_word(text: str) -> str:
    words = [w.strip(".,;:!?*_`'\"()") for w in text.split()]
    return next((w for w in reversed(words) if len(w) >= 3), "")


def start(session: str, home) -> None:
    # the environment goes in the command: a tmux server keeps the environment it started with
    cmd = shlex.join(["env", f"LOCALMIX_HOME={home}", "TERM=xterm-256color", sys.executable, "-m", "localmix", "chat", "--ctx", "1024"])
    tmux("new-session", "-d", "-s", session, "-x", "120", "-y", "32", cmd, check=True)


def test_chat_in_tmux_answers_and_remembers(tmp_path):
    home = tmp_path / "home"
    session = "chat"
    try:
        start(session, home)
        wait_for(session, "100% CPU")  # the demo model was built and loaded
        tmux("send-keys", "-t", session, "Write a haiku about the sea.", "Enter", check=True)
        wait_for(session, "· ctx ")  # the status bar shows the context used once the reply is done
        reply = last_reply(home / "chats.sqlite3")
        tail_word = last_word(reply)
        assert tail_word and tail_word in screen(session)  # the view follows the reply to its end
        tmux("send-keys", "-t", session, "C-q", check=True)
        end = time.time() + 20
        while tmux("has-session", "-t", session, capture_output=True).returncode == 0 and time.time() < end:
            time.sleep(0.2)
        start(session, home)
        shown = wait_for(session, tail_word, timeout=60)  # the last chat is back, scrolled to its end
        assert "Write a haiku" in shown  # its title in the side list
    finally:
        tmux("kill-server", capture_output=True)
