"""Streaming in the chat app is cheap: many pieces arrive, few redraws happen (a redraw's CPU is taken from
llama.cpp's decode threads on a small machine), the whole reply is shown as Markdown at the end, and Esc
still stops a reply mid-stream. The real app under Textual's pilot; a fake backend at the edge streams
500 pieces."""

from __future__ import annotations

import time

import pytest

from localmix.app.chat import RENDER_HZ, LiveText, MessageView, PromptInput, for_display
from tests.support.fake_backend import FakeBackend
from tests.test_app_chat import make_app, wait_idle

PIECES = 500


class ManyPieces(FakeBackend):
    """500 words, `pause` seconds apart."""

    def __init__(self, pause: float):
        super().__init__(slow=True)
        self.pause = pause

    def words(self, prompt: str) -> list[str]:
        return [f"w{i}" for i in range(PIECES)]

    def generate(self, tokens, sampling, grammar=None):
        for event in super().generate(tokens, sampling, grammar):
            time.sleep(self.pause)  # FakeBackend's own 20 ms are skipped below
            yield event


def fast(backend: ManyPieces) -> ManyPieces:
    backend.slow = False  # the words stay; only FakeBackend's 20 ms per word go
    return backend


async def start(pilot, text: str) -> LiveText:
    await wait_idle(pilot)
    pilot.app.query_one("#prompt", PromptInput).text = text
    await pilot.press("enter")
    await pilot.pause(0.05)
    return pilot.app.query_one(LiveText)


@pytest.mark.anyio
async def test_many_pieces_few_redraws_and_the_whole_reply_at_the_end(tmp_path):
    app, backend, store = make_app(tmp_path, fast(ManyPieces(0.003)))
    expected = " ".join(f"w{i}" for i in range(PIECES))
    async with app.run_test(size=(100, 30)) as pilot:
        live = await start(pilot, "go")
        t0 = time.monotonic()
        await wait_idle(pilot)
        seconds = time.monotonic() - t0 + 0.05
        reply = app.query(MessageView).last()
        assert reply.role == "assistant" and reply.content_text() == for_display(expected)
        assert not app.query(LiveText), "the plain streaming text is gone: the Markdown shows the reply"
        assert store.messages(app.chat.id)[-1].content == expected
        assert 1 <= live.shown <= seconds * RENDER_HZ + 2 and live.shown < PIECES / 10, (live.shown, seconds)


@pytest.mark.anyio
async def test_escape_stops_a_fast_stream_and_shows_exactly_what_was_written(tmp_path):
    app, backend, store = make_app(tmp_path, fast(ManyPieces(0.01)))
    async with app.run_test(size=(100, 30)) as pilot:
        live = await start(pilot, "go")
        await pilot.pause(0.5)
        assert app.generating and not app.query_one("#prompt", PromptInput).cursor_blink  # a blink would be a redraw
        await pilot.press("escape")
        await wait_idle(pilot)
        saved = store.messages(app.chat.id)[-1]
        words = saved.content.split()
        assert 0 < len(words) < PIECES and words == [f"w{i}" for i in range(len(words))]
        assert app.query(MessageView).last().content_text() == for_display(saved.content)
        assert app.last_stats.stop == "cancelled" and live.shown < len(words)
        assert app.query_one("#prompt", PromptInput).cursor_blink
