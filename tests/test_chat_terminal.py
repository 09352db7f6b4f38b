"""`localmix chat` in a real terminal: tmux runs it, we type a question, wait for the answer, quit,
reopen, and find the conversation again."""

import os
import shutil
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")


def screen(session: str) -> str:
    return subprocess.run(["tmux", "capture-pane", "-p", "-t", session], capture_output=True, text=True).stdout


def wait_for(session: str, text: str, timeout: float = 120) -> str:
    end = time.time() + timeout
    while time.time() < end:
        shown = screen(session)
        if text in shown:
            return shown
        time.sleep(0.25)
    raise AssertionError(f"{text!r} never appeared on screen:\n{screen(session)}")


def start(session: str, env: dict) -> None:
    cmd = f"{sys.executable} -m localmix chat --ctx 1024"
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "120", "-y", "32", cmd], check=True, env=env)


def test_chat_in_tmux_answers_and_remembers(tmp_path):
    env = {**os.environ, "LOCALMIX_HOME": str(tmp_path / "home"), "TERM": "xterm-256color"}
    session = f"localmix-test-{os.getpid()}"
    try:
        start(session, env)
        wait_for(session, "100% CPU")  # the demo model was built and loaded
        subprocess.run(["tmux", "send-keys", "-t", session, "Write a haiku about the sea.", "Enter"], check=True)
        wait_for(session, "TTFT")  # the status bar shows the reply's speed once it is done
        shown = screen(session)
        assert "Model" in shown and "Write a haiku about the sea." in shown
        subprocess.run(["tmux", "send-keys", "-t", session, "C-q"], check=True)
        end = time.time() + 20
        while subprocess.run(["tmux", "has-session", "-t", session], capture_output=True).returncode == 0 and time.time() < end:
            time.sleep(0.2)
        start(session, env)
        shown = wait_for(session, "Write a haiku about the sea.", timeout=60)
        assert "Model" in shown
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
