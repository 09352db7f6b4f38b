"""`localmix chat --server`: the Textual app, driven by its pilot, chatting with a real localmix server on
127.0.0.1 (the smol model) through the OpenAI backend, put together as commands/chat.py does it."""

from __future__ import annotations

import time

import pytest

from localmix.app.chat import ChatApp, MessageView, PromptInput
from localmix.commands.chat import make_server_prepare
from localmix.store import Store


def make_app(tmp_path, url):
    store = Store(tmp_path / "chats.sqlite3")
    return ChatApp(make_server_prepare(url), store, "server model"), store


async def wait_idle(pilot, timeout=60.0):
    end = time.monotonic() + timeout
    await pilot.pause()
    while (pilot.app.generating or (pilot.app.backend is None and not pilot.app.load_error)) and time.monotonic() < end:
        await pilot.pause(0.05)
    await pilot.pause()


async def send(pilot, text):
    prompt = pilot.app.query_one("#prompt", PromptInput)
    prompt.text = text
    prompt.focus()
    await pilot.press("enter")
    await wait_idle(pilot)


def status(app) -> str:
    return str(app.query_one("#status").render())


@pytest.mark.anyio
async def test_a_reply_from_the_server_is_shown_and_saved(tmp_path, smol_url):  # conftest: a real server, ctx 1024
    app, store = make_app(tmp_path, smol_url)
    async with app.run_test(size=(120, 30)) as pilot:
        await wait_idle(pilot)
        assert app.backend is not None, app.load_error
        store.update_settings(app.chat.id, max_tokens=16, temperature=0.0, seed=3)
        app.chat = store.chat(app.chat.id)
        await send(pilot, "What is the capital of France?")
        msgs = store.messages(app.chat.id)
        assert [m.role for m in msgs] == ["user", "assistant"] and msgs[1].content.strip() and msgs[1].complete
        views = list(app.query(MessageView))
        assert [v.role for v in views] == ["user", "assistant"] and views[1].content_text().strip()
        port = smol_url.rsplit(":", 1)[1].strip("/")
        text = status(app)
        assert f"server 127.0.0.1:{port} · " in text and "CPU" in text  # where it runs, and the server's split
        assert app.model_label == app.backend.model and app.backend.model in text
        assert f"/{app.backend.ctx}" in text  # ctx used/total, from the server's numbers
    store.close()


@pytest.mark.anyio
async def test_a_server_error_is_a_line_in_the_app(tmp_path, smol_url):
    app, store = make_app(tmp_path, smol_url)
    async with app.run_test(size=(120, 30)) as pilot:
        await wait_idle(pilot)
        too_long = "word " * (app.backend.ctx + 100)  # more tokens than the server's context holds
        await send(pilot, too_long)
        errors = [str(w.render()) for w in app.query(".error")]
        assert errors and "context" in errors[-1] and str(app.backend.ctx) in errors[-1]
        assert store.messages(app.chat.id) == []  # the message failed at once: it went back to the prompt
        assert app.query_one("#prompt", PromptInput).text.startswith("word word")
        app.query_one("#prompt", PromptInput).text = ""
        store.update_settings(app.chat.id, max_tokens=4)
        app.chat = store.chat(app.chat.id)
        await send(pilot, "Hello!")  # the app, and the server, go on
        assert [m.role for m in store.messages(app.chat.id)] == ["user", "assistant"]
    store.close()


@pytest.mark.anyio
async def test_an_unreachable_server_is_shown_not_fatal(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app, store = make_app(tmp_path, f"http://127.0.0.1:{port}")
    async with app.run_test(size=(120, 30)) as pilot:
        await wait_idle(pilot)
        assert app.backend is None and "cannot reach the server" in app.load_error
        assert "not loaded" in status(app)
    store.close()


@pytest.mark.parametrize(("args", "expect"), [
    (["--server", "http://127.0.0.1:1", "some-model"], "MODEL (some-model) and --server exclude each other"),
    (["--model", "llama3"], "--model and --api-key go with --server URL"),
    (["--server", "http://127.0.0.1:1", "--ctx", "2048", "--vram", "0"], "chat --server: --vram, --ctx plan a model loaded here"),
    (["--server", "ftp://127.0.0.1/"], "--server ftp://127.0.0.1/: not an http:// or https:// URL"),
])
def test_server_flags_misused_are_one_line(args, expect):
    from tests.support.cli import one_line_error, run_cli

    r = run_cli("chat", *args)
    assert one_line_error(r, expect), r.stderr


def test_api_key_from_the_flag_then_the_environment(monkeypatch):
    import argparse

    from localmix.commands.chat import api_key

    monkeypatch.delenv("LOCALMIX_API_KEY", raising=False)
    monkeypatch.setenv("OPENAI_API_KEY", "openai-key")
    assert api_key(argparse.Namespace(api_key=None)) == "openai-key"
    monkeypatch.setenv("LOCALMIX_API_KEY", "localmix-key")
    assert api_key(argparse.Namespace(api_key=None)) == "localmix-key"
    assert api_key(argparse.Namespace(api_key="flag-key")) == "flag-key"
