"""`localmix chat` in a real terminal: tmux runs it, we type a question, wait for the answer, quit,
reopen, and find the conversation again; we kill it with SIGKILL while a reply streams, reopen, and find
the reply so far, marked as cut off, and the chat going on; two started together on a fresh folder both
open. Without a terminal, `chat` says so and exits."""

import os
import shlex
import shutil
import signal
import sqlite3
import subprocess
import sys
import time

import psutil
import pytest

from tests.support.cli import one_line_error

needs_tmux = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")


SOCKET = f"localmix-test-{os.getpid()}"  # a tmux server of our own, whatever the user runs


def tmux(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(["tmux", "-L", SOCKET, *args], **kw)


def screen(session: str) -> str:
    return tmux("capture-pane", "-p", "-t", session, capture_output=True, text=True).stdout


def wait_for(session: str, text: str, timeout: float = 300) -> str:
    end = time.time() + timeout
    while time.time() < end:
        shown = screen(session)
        if text in shown:
            return shown
        time.sleep(0.25)
    raise AssertionError(f"{text!r} never appeared on screen:\n{screen(session)}")


def last_reply(db) -> str:
    con = sqlite3.connect(db)
    try:
        return con.execute("SELECT content FROM messages WHERE role = 'assistant' ORDER BY id DESC LIMIT 1").fetchone()[0]
    finally:
        con.close()


def last_word(text: str) -> str:
    words = [w.strip(".,;:!?*_`'\"()") for w in text.split()]
    return next((w for w in reversed(words) if len(w) >= 3), "")


def messages(db) -> list[tuple[str, str, int]]:
    """(role, content, complete) of every message, read as another process would."""
    con = sqlite3.connect(db, timeout=30)
    try:
        return con.execute("SELECT role, content, complete FROM messages ORDER BY id").fetchall()
    except sqlite3.OperationalError:  # not created yet
        return []
    finally:
        con.close()


def start(session: str, home) -> None:
    # the environment goes in the command: a tmux server keeps the environment it started with
    cmd = shlex.join(["env", f"LOCALMIX_HOME={home}", "TERM=xterm-256color", sys.executable, "-m", "localmix", "chat", "--ctx", "1024"])
    tmux("new-session", "-d", "-s", session, "-x", "120", "-y", "32", cmd, check=True)


@needs_tmux
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


@pytest.fixture(scope="module")
def demo_gguf(tmp_path_factory):
    """The demo model, built once for the tests below (the test above builds it as a first run does)."""
    from localmix.demo import DEMO_FILE, build_demo, source_gguf

    out = tmp_path_factory.mktemp("demo") / DEMO_FILE
    build_demo(source_gguf(), out)
    return out


def home_with_demo(tmp_path, demo_gguf):
    home = tmp_path / "home"
    (home / "models" / "demo").mkdir(parents=True)
    (home / "models" / "demo" / demo_gguf.name).symlink_to(demo_gguf)
    return home


def chat_process(session: str) -> psutil.Process:
    """The `localmix chat` running in the session's pane (tmux's shell may or may not exec it)."""
    pane = psutil.Process(int(tmux("display-message", "-p", "-t", session, "#{pane_pid}", capture_output=True,
                                   text=True, check=True).stdout))
    return next(p for p in [pane, *pane.children(recursive=True)] if "localmix" in p.cmdline() and "chat" in p.cmdline())


def wait_gone(session: str, timeout: float = 20) -> None:
    end = time.time() + timeout
    while tmux("has-session", "-t", session, capture_output=True).returncode == 0 and time.time() < end:
        time.sleep(0.1)


@needs_tmux
def test_chat_killed_mid_reply_keeps_the_reply_so_far_and_goes_on(tmp_path, demo_gguf):
    """SIGKILL while the real demo model streams a reply: reopened, the reply so far is there, marked as
    cut off, and the chat answers the next message (it was broken for good: two user messages in a row)."""
    home = home_with_demo(tmp_path, demo_gguf)
    db = home / "chats.sqlite3"
    session = "crash"
    try:
        start(session, home)
        wait_for(session, "100% CPU")
        tmux("send-keys", "-t", session, "Write a very long story about a dragon who learns to bake bread.", "Enter", check=True)
        end = time.time() + 120
        while time.time() < end:  # kill as soon as a good part of the reply was shown and saved
            rows = messages(db)
            if rows and rows[-1][0] == "assistant" and len(rows[-1][1]) >= 80:
                break
            time.sleep(0.05)
        chat_process(session).send_signal(signal.SIGKILL)
        wait_gone(session)
        rows = messages(db)
        assert [r[0] for r in rows] == ["user", "assistant"]
        partial = rows[-1][1]
        assert rows[-1][2] == 0, "the reply was finished before the kill: the test needs a longer one"
        assert len(partial) >= 80

        start(session, home)
        wait_for(session, "100% CPU")
        shown = wait_for(session, "cut off")  # the reply so far, marked
        assert last_word(partial) in shown
        tmux("send-keys", "-t", session, "Thank you. Now say hello.", "Enter", check=True)
        end = time.time() + 120
        while time.time() < end and not (len(rows := messages(db)) == 4 and rows[-1][1].strip()):
            time.sleep(0.1)  # an answer is being written
        tmux("send-keys", "-t", session, "Escape", check=True)  # stopped or not, it ends complete
        wait_for(session, "· ctx ")  # the status bar shows the context used once a reply is done
        rows = messages(db)
        assert [(r[0], r[2]) for r in rows] == [("user", 1), ("assistant", 0), ("user", 1), ("assistant", 1)]
        assert rows[1][1] == partial and rows[-1][1].strip()
        assert "Error" not in screen(session)
        tmux("send-keys", "-t", session, "C-q", check=True)
        wait_gone(session)
    finally:
        tmux("kill-server", capture_output=True)


@needs_tmux
def test_two_chats_started_together_on_a_fresh_folder_both_open(tmp_path, demo_gguf):
    home = home_with_demo(tmp_path, demo_gguf)
    try:
        for session in ("one", "two"):
            start(session, home)
        for session in ("one", "two"):
            wait_for(session, "100% CPU")
        for session in ("one", "two"):  # both answer, and both keep what they wrote
            tmux("send-keys", "-t", session, "Say hi.", "Enter", check=True)
            wait_for(session, "· ctx ")
        rows = messages(home / "chats.sqlite3")
        assert sorted((r[0], r[2]) for r in rows) == [("assistant", 1), ("assistant", 1), ("user", 1), ("user", 1)]
    finally:
        tmux("kill-server", capture_output=True)


@pytest.mark.parametrize("where", ["stdin", "stdout"])
def test_chat_without_a_terminal_says_so_and_exits(tmp_path, where):
    import pty

    main, child = pty.openpty()  # a terminal for the other end
    try:
        streams = {"stdin": subprocess.DEVNULL, "stdout": child} if where == "stdin" else {"stdin": child, "stdout": subprocess.PIPE}
        r = subprocess.run([sys.executable, "-m", "localmix", "chat"], stderr=subprocess.PIPE, text=True, timeout=60,
                           env={**os.environ, "LOCALMIX_HOME": str(tmp_path / "home")}, **streams)
    finally:
        os.close(main)
        os.close(child)
    assert one_line_error(r, "chat needs a terminal"), r.stderr
    assert not (tmp_path / "home").exists()  # nothing made, not even the chats database
