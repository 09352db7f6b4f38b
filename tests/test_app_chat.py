"""The chat app driven by Textual's pilot. A fake backend (at the edge: it stands in for llama.cpp, not
for the app, the prompt or the tool loop) streams scripted replies so that UI behaviour can be tested
exactly; one test runs the real demo model through the real backend."""

from __future__ import annotations

import time

import pytest

from localmix.app.chat import ChatApp, MessageView, PromptInput
from localmix.store import Store
from tests.support.fake_backend import MIXTRAL, FakeBackend, ToolCallingBackend


def make_app(tmp_path, backend=None, **kw):
    backend = backend or FakeBackend()
    store = Store(tmp_path / "chats.sqlite3")
    app = ChatApp(lambda progress, path: (backend, {"split": "100% CPU", "summary": "CPU only: fake"}), store, "fake-model", **kw)
    return app, backend, store


async def send(pilot, text):
    prompt = pilot.app.query_one("#prompt", PromptInput)
    prompt.text = text
    prompt.focus()
    await pilot.press("enter")
    await wait_idle(pilot)


async def wait_idle(pilot, timeout=10.0):
    end = time.monotonic() + timeout
    await pilot.pause()
    while (pilot.app.generating or pilot.app.backend is None) and time.monotonic() < end:
        await pilot.pause(0.05)
    await pilot.pause()


@pytest.mark.anyio
async def test_send_streams_and_persists(tmp_path):
    app, backend, store = make_app(tmp_path)
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_idle(pilot)
        await send(pilot, "hello there")
        views = list(app.query(MessageView))
        assert [v.role for v in views] == ["user", "assistant"]
        msgs = store.messages(app.chat.id)
        assert [m.content for m in msgs] == ["hello there", "reply 1 to hello there"]
        assert app.chat.title == "hello there"
        assert "fake-model" in str(app.query_one("#status").render())


@pytest.mark.anyio
async def test_escape_stops_and_keeps_the_partial_reply(tmp_path):
    app, backend, store = make_app(tmp_path, FakeBackend(slow=True))
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_idle(pilot)
        prompt = app.query_one("#prompt", PromptInput)
        prompt.text = "tell me a story"
        await pilot.press("enter")
        await pilot.pause(0.3)
        assert app.generating
        t0 = time.monotonic()
        await pilot.press("escape")
        await wait_idle(pilot)
        assert time.monotonic() - t0 < 1.0
        reply = store.messages(app.chat.id)[-1]
        assert reply.role == "assistant" and reply.content.startswith("reply 1 to tell me a story")
        assert 4 < len(reply.content.split()) < 100


@pytest.mark.anyio
async def test_keys_answer_while_a_reply_streams(tmp_path):
    app, backend, store = make_app(tmp_path, FakeBackend(slow=True))
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_idle(pilot)
        app.query_one("#prompt", PromptInput).text = "go"
        await pilot.press("enter")
        await pilot.pause(0.2)
        handled = []
        original = app.action_help
        app.action_help = lambda: (handled.append(time.monotonic()), original())  # when the key is acted on
        t0 = time.monotonic()
        await pilot.press("f1")
        await pilot.pause()
        assert app.generating, "the reply is still streaming"
        assert handled and handled[0] - t0 < 0.1
        assert app.screen.__class__.__name__ == "HelpScreen"
        await pilot.press("escape")
        await pilot.press("escape")
        await wait_idle(pilot)


@pytest.mark.anyio
async def test_regenerate_and_edit_last(tmp_path):
    app, backend, store = make_app(tmp_path)
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_idle(pilot)
        await send(pilot, "first question")
        await pilot.press("ctrl+r")
        await wait_idle(pilot)
        assert [m.content for m in store.messages(app.chat.id)] == ["first question", "reply 2 to first question"]
        assert len(app.query(MessageView)) == 2
        await pilot.press("up")  # on the empty prompt: edit the last message
        await pilot.pause()
        assert store.messages(app.chat.id) == [] and app.query_one("#prompt", PromptInput).text == "first question"
        app.query_one("#prompt", PromptInput).text = "better question"
        await pilot.press("enter")
        await wait_idle(pilot)
        assert [m.content for m in store.messages(app.chat.id)] == ["better question", "reply 3 to better question"]


@pytest.mark.anyio
async def test_new_switch_rename_delete_and_restart(tmp_path):
    app, backend, store = make_app(tmp_path)
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_idle(pilot)
        await send(pilot, "about cats")
        first = app.chat.id
        await pilot.press("ctrl+n")
        await send(pilot, "about dogs")
        second = app.chat.id
        assert first != second and len(store.chats()) == 2
        app.query_one("#chats").focus()
        app.query_one("#chats").index = 1  # the older chat
        await pilot.press("enter")
        await pilot.pause()
        assert app.chat.id == first and [v.role for v in app.query(MessageView)] == ["user", "assistant"]
        await pilot.press("f2")
        await pilot.pause()
        for _ in range(20):
            await pilot.press("backspace")
        await pilot.press(*"Cats")
        await pilot.press("enter")
        await pilot.pause()
        assert store.chat(first).title == "Cats"
        await pilot.press("f8")
        await pilot.pause()
        assert store.chat(first) is None and app.chat.id == second
    store.close()
    # a restart resumes the last chat, with its messages
    app2, _, store2 = make_app(tmp_path)
    async with app2.run_test(size=(100, 30)) as pilot:
        await wait_idle(pilot)
        assert app2.chat.id == second
        assert [m.content for m in store2.messages(second)] == ["about dogs", "reply 2 to about dogs"]
        assert len(app2.query(MessageView)) == 2


@pytest.mark.anyio
async def test_settings_apply_to_the_chat(tmp_path):
    app, backend, store = make_app(tmp_path)
    async with app.run_test(size=(100, 40)) as pilot:
        await wait_idle(pilot)
        await pilot.press("f3")
        await pilot.pause()
        screen = app.screen
        screen.query_one("#system").text = "You are a pirate."
        screen.query_one("#temperature").value = "0.2"
        screen.query_one("#max_tokens").value = "64"
        await pilot.click("#save")
        await pilot.pause()
        c = store.chat(app.chat.id)
        assert (c.system, c.temperature, c.max_tokens) == ("You are a pirate.", 0.2, 64)
        await send(pilot, "ahoy")
        assert backend.seen[-1].startswith("<|im_start|>system\nYou are a pirate.<|im_end|>")


@pytest.mark.anyio
async def test_context_overflow_leaves_out_oldest_turns_but_never_the_system_prompt(tmp_path):
    app, backend, store = make_app(tmp_path, FakeBackend(ctx=120), system="Stay calm.")
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_idle(pilot)
        store.update_settings(app.chat.id, max_tokens=20)
        app.chat = store.chat(app.chat.id)
        for i in range(6):
            await send(pilot, f"message number {i} " + "word " * 10)
        last_prompt = backend.seen[-1]
        assert last_prompt.startswith("<|im_start|>system\nStay calm.<|im_end|>\n<|im_start|>user\nmessage number ")
        assert "number 0" not in last_prompt and "number 5" in last_prompt
        assert backend.prompt_tokens[-1] <= 120 - 20
        notices = [str(w.render()) for w in app.query(".notice")]
        assert notices and "left out of the prompt" in notices[-1]


@pytest.mark.anyio
async def test_any_language_and_export(tmp_path):
    app, backend, store = make_app(tmp_path, exports=tmp_path / "exports")
    text = "Ça va très bien, grüße aus München! ¿Qué tal? 東京 🚀"
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_idle(pilot)
        await send(pilot, text)
        assert store.messages(app.chat.id)[-1].content == f"reply 1 to {text}"
        await pilot.press("ctrl+s")
        await pilot.pause()
        [exported] = (tmp_path / "exports").glob("*.md")
        assert text in exported.read_text(encoding="utf-8")


@pytest.mark.anyio
async def test_load_failure_is_shown_and_chats_survive(tmp_path):
    store = Store(tmp_path / "chats.sqlite3")
    old = store.new_chat(title="kept")
    store.add_message(old.id, "user", "still here")

    def broken(progress, path):
        raise RuntimeError("model file is corrupt")

    app = ChatApp(broken, store, "broken-model")
    async with app.run_test(size=(100, 30)) as pilot:
        for _ in range(40):
            await pilot.pause(0.05)
            if app.load_error:
                break
        assert "corrupt" in app.load_error
        assert any("could not be loaded" in str(w.render()) for w in app.query(".error"))
        app.query_one("#prompt", PromptInput).text = "hello"
        await pilot.press("enter")
        await pilot.pause()
        assert [m.content for m in store.messages(old.id)] == ["still here"]


@pytest.mark.anyio
async def test_real_demo_model_answers(tmp_path):
    """The demo model, built on first use from SmolLM2 without torch, through the real backend."""
    from localmix.commands.chat import make_prepare

    store = Store(tmp_path / "chats.sqlite3")
    app = ChatApp(make_prepare(ctx=1024, threads=2), store, "demo", demo=True)
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_idle(pilot, timeout=120)
        assert app.backend is not None, app.load_error
        await send(pilot, "Write a haiku about the sea.")
        await wait_idle(pilot, timeout=120)
        reply = store.messages(app.chat.id)[-1]
        assert reply.role == "assistant" and reply.content.strip()
        assert app.last_stats.gen_tokens > 0 and "tok/s" in str(app.query_one("#status").render())


@pytest.mark.anyio
async def test_model_picker_when_the_store_has_several(tmp_path):
    loaded = []

    def prepare(progress, path):
        loaded.append(path)
        return FakeBackend(), {"split": "100% CPU", "summary": "fake"}

    store = Store(tmp_path / "chats.sqlite3")
    app = ChatApp(prepare, store, "?", choices=[("a", "/models/a.gguf"), ("b", "/models/b.gguf")])
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.pause()
        assert app.screen.__class__.__name__ == "ModelPicker"
        await pilot.press("down", "enter")
        await wait_idle(pilot)
        assert loaded == ["/models/b.gguf"] and app.model_label == "b"
        await send(pilot, "hi")
        assert store.messages(app.chat.id)[-1].content == "reply 1 to hi"


def note_tools(target):
    from localmix.tools import ToolSet, from_function, tool

    @tool(side_effects=True)
    def save_note(text: str) -> str:
        """Save a note."""
        target.write_text(text)
        return "saved"

    return ToolSet([from_function(save_note)])


@pytest.mark.anyio
@pytest.mark.parametrize("answer, saved", [("y", True), ("n", False)])
async def test_side_effect_tools_ask_first_and_calls_are_shown(tmp_path, answer, saved):
    target = tmp_path / "note.txt"
    app, backend, store = make_app(tmp_path, ToolCallingBackend(), toolset=note_tools(target))
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_idle(pilot)
        app.query_one("#prompt", PromptInput).text = "remember milk"
        await pilot.press("enter")
        for _ in range(500):  # up to 10 s: a busy machine (CI beside other work) is slow to get there
            await pilot.pause(0.02)
            if app.screen.__class__.__name__ == "ConfirmScreen":
                break
        assert app.screen.__class__.__name__ == "ConfirmScreen" and not target.exists()
        await pilot.press(answer)
        await wait_idle(pilot)
        assert target.exists() is saved
        roles = [(m.role, bool(m.tool_calls)) for m in store.messages(app.chat.id)]
        assert roles == [("user", False), ("assistant", True), ("tool", False), ("assistant", False)]
        final = store.messages(app.chat.id)[-1].content
        assert final == ("Done: saved" if saved else 'Done: {"error": "the user did not allow this call"}')
        tool_views = [v for v in app.query(MessageView) if v.role == "tool"]
        assert len(tool_views) == 1 and "save_note" in tool_views[0].content_text()


# -- crashes and errors: nothing is lost, nothing ends the app ------------------------------------------------


def errors(app) -> list[str]:
    return [str(w.render()) for w in app.query(".error")]


def cut_off(app) -> list[MessageView]:
    return [v for v in app.query(MessageView) if v.query(".cutoff")]


@pytest.mark.anyio
async def test_a_streaming_reply_is_saved_as_it_grows_and_completed_at_the_end(tmp_path):
    app, backend, store = make_app(tmp_path, FakeBackend(slow=True))
    other = Store(tmp_path / "chats.sqlite3")  # what another process (or this one restarted) would read
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_idle(pilot)
        app.query_one("#prompt", PromptInput).text = "tell me a story"
        await pilot.press("enter")
        seen = []
        for _ in range(40):  # 200 words at 20 ms each: about 4 s
            await pilot.pause(0.1)
            last = other.messages(app.chat.id)[-1]
            if last.role == "assistant":
                seen.append((len(last.content), last.complete))
        await wait_idle(pilot)
        assert len({n for n, _ in seen}) >= 3, f"saved only {seen}"  # it grew, in several saves
        assert not any(done for _, done in seen[:3])  # marked incomplete while it was written
        final = other.messages(app.chat.id)
        assert [m.role for m in final] == ["user", "assistant"] and final[-1].complete
        assert final[-1].content.endswith("w199") and final[-1].stats["stop"] == "eos"
        assert not cut_off(app)


@pytest.mark.anyio
async def test_a_stopped_reply_is_kept_complete(tmp_path):
    app, backend, store = make_app(tmp_path, FakeBackend(slow=True))
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_idle(pilot)
        app.query_one("#prompt", PromptInput).text = "go on"
        await pilot.press("enter")
        await pilot.pause(0.8)
        await pilot.press("escape")
        await wait_idle(pilot)
        [_, reply] = store.messages(app.chat.id)
        assert reply.complete and reply.stats["stop"] == "cancelled" and not cut_off(app)


@pytest.mark.anyio
async def test_quitting_mid_reply_stops_it_and_keeps_all_of_it_as_cut_off(tmp_path):
    app, backend, store = make_app(tmp_path, FakeBackend(slow=True))
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_idle(pilot)
        app.query_one("#prompt", PromptInput).text = "tell me a story"
        await pilot.press("enter")
        await pilot.pause(0.7)
        await pilot.press("ctrl+q")
    assert app.stop_generating(timeout=5)  # what `chat` does before it closes the model
    [_, reply] = store.messages(app.chat.id)
    assert not reply.complete and reply.content.startswith("reply 1 to tell me a story w0")
    assert reply.content == app._reply_text and backend._cancel.is_set()  # all it wrote, none lost


def crashed_chat(tmp_path, texts: list[tuple[str, str]], partial: str | None):
    """The store as a crash leaves it: `texts` (role, content), then a reply saved while it streamed."""
    store = Store(tmp_path / "chats.sqlite3")
    chat = store.new_chat(title="crashed")
    for role, text in texts:
        store.add_message(chat.id, role, text)
    if partial is not None:
        store.draft(chat.id).update(partial)
    store.close()
    return chat


@pytest.mark.anyio
async def test_a_cut_off_reply_is_shown_as_such_and_can_be_regenerated(tmp_path):
    chat = crashed_chat(tmp_path, [("user", "tell me a story")], "Once upon a time there")
    app, backend, store = make_app(tmp_path)
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_idle(pilot)
        assert app.chat.id == chat.id
        [view] = cut_off(app)
        assert view.role == "assistant" and "Once upon a time there" in view.content_text()
        assert "Ctrl+R" in str(view.query_one(".cutoff").render())
        await pilot.press("ctrl+r")
        await wait_idle(pilot)
        msgs = store.messages(chat.id)
        assert [(m.role, m.content, m.complete) for m in msgs] == [
            ("user", "tell me a story", True), ("assistant", "reply 1 to tell me a story", True)]
        assert not cut_off(app) and len(app.query(MessageView)) == 2


@pytest.mark.anyio
async def test_a_cut_off_reply_is_kept_when_the_chat_goes_on(tmp_path):
    chat = crashed_chat(tmp_path, [("user", "first")], "half an ans")
    app, backend, store = make_app(tmp_path)
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_idle(pilot)
        await send(pilot, "second")
        msgs = store.messages(chat.id)
        assert [(m.content, m.complete) for m in msgs] == [
            ("first", True), ("half an ans", False), ("second", True), ("reply 1 to second", True)]
        assert "half an ans" in backend.seen[-1]  # the model sees what it had written
        assert len(cut_off(app)) == 1


@pytest.mark.anyio
async def test_a_reply_that_never_started_can_be_written_with_regenerate(tmp_path):
    chat = crashed_chat(tmp_path, [("user", "hello")], None)  # killed before the first word was saved
    app, backend, store = make_app(tmp_path)
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_idle(pilot)
        await pilot.press("ctrl+r")
        await wait_idle(pilot)
        assert [m.content for m in store.messages(chat.id)] == ["hello", "reply 1 to hello"]


@pytest.mark.anyio
async def test_two_user_messages_in_a_row_open_and_the_chat_goes_on(tmp_path):
    """What a crash before the first saved word left (older versions saved nothing of a reply): Mixtral's
    template refuses two user turns in a row; the chat must still answer."""
    chat = crashed_chat(tmp_path, [("user", "first question"), ("user", "first question again")], None)
    app, backend, store = make_app(tmp_path, FakeBackend(template=MIXTRAL))
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_idle(pilot)
        assert [v.role for v in app.query(MessageView)] == ["user", "user"]
        await send(pilot, "are you there?")
        assert errors(app) == [], errors(app)
        msgs = store.messages(chat.id)
        assert msgs[-1].role == "assistant" and "are you there?" in msgs[-1].content
        await send(pilot, "and now?")
        assert store.messages(chat.id)[-1].content.endswith("and now?") and errors(app) == []


BAD_TEMPLATE = "{{ raise_exception('this template refuses everything [/INST] [b]') }}"


@pytest.mark.anyio
async def test_a_template_error_is_shown_not_raised_and_the_message_comes_back(tmp_path):
    app, backend, store = make_app(tmp_path, FakeBackend(template=BAD_TEMPLATE))
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_idle(pilot)
        for _ in range(3):  # retrying never piles up user messages
            await send(pilot, "hello")
            assert app.is_running
            assert store.messages(app.chat.id) == []
            assert app.query_one("#prompt", PromptInput).text == "hello"
            app.query_one("#prompt", PromptInput).text = ""
        shown = errors(app)
        assert len(shown) == 3 and "chat template" in shown[-1] and "refuses everything [/INST] [b]" in shown[-1]
        assert not app.query(MessageView)


@pytest.mark.anyio
async def test_an_unexpected_failure_mid_reply_is_shown_and_the_text_so_far_kept(tmp_path):
    app, backend, store = make_app(tmp_path, FakeBackend(fail_after=3))
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_idle(pilot)
        await send(pilot, "hello there friend")
        assert app.is_running and "unexpected RuntimeError: llama_decode returned -3" in errors(app)[-1]
        [user, reply] = store.messages(app.chat.id)
        assert (reply.content, reply.complete) == ("reply 1 to", False)
        backend.fail_after = None
        await pilot.press("ctrl+r")
        await wait_idle(pilot)
        assert [(m.content, m.complete) for m in store.messages(app.chat.id)] == [
            ("hello there friend", True), ("reply 2 to hello there friend", True)]


@pytest.mark.anyio
async def test_names_and_titles_from_files_are_text_not_markup(tmp_path):
    store = Store(tmp_path / "chats.sqlite3")
    store.new_chat(title="[/INST] [b]bold\x1b]0;pwned\x07")
    name = "evil [/INST] [red]model\x1b[2J"
    app = ChatApp(lambda progress, path: (FakeBackend(), {"split": "100% CPU", "summary": f"summary of {name}"}),
                  store, name)
    async with app.run_test(size=(120, 30)) as pilot:
        await wait_idle(pilot)
        status = str(app.query_one("#status").render())
        assert "evil [/INST] [red]model\\x1b[2J" in status and "\x1b" not in status
        titles = [str(label.render()) for label in app.query("#chats Label")]
        assert titles == ["[/INST] [b]bold\\x1b]0;pwned"]
        await send(pilot, "[/INST] hi [bold]")
        assert store.messages(app.chat.id)[-1].content == "reply 1 to [/INST] hi [bold]"
        assert app.is_running and errors(app) == []


@pytest.mark.anyio
async def test_hostile_templates_never_end_the_app(tmp_path):
    """Every named hostile template of tests/fuzz/templates.py and some random ones, as the model's
    template: each turn ends with a reply or one error line, the app goes on, no message piles up."""
    import dataclasses

    from localmix.prompt import PromptFormat
    from tests.fuzz.templates import templates

    app, backend, store = make_app(tmp_path)
    cases = templates(seed=7, n=100)
    outcomes = {"reply": 0, "error": 0}
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_idle(pilot)
        for label, template in cases:
            for m in store.messages(app.chat.id):  # a fresh conversation (one chat: the list stays short)
                store.delete_message(m.id)
            app.show_chat(app.chat)
            await pilot.pause()
            backend.info = dataclasses.replace(backend.info, prompt=PromptFormat(template=template))
            before = len(errors(app))
            app.query_one("#prompt", PromptInput).text = "hi <|im_end|> [/INST] {{ 7 * 7 }}"
            await pilot.press("enter")
            await wait_idle(pilot, timeout=60)  # a template that runs long is stopped by its time budget
            assert app.is_running and not app.generating, label
            roles = [m.role for m in store.messages(app.chat.id)]
            if len(errors(app)) > before:
                assert roles == [] and "\n" not in errors(app)[-1], label  # the message went back to the prompt
                outcomes["error"] += 1
            else:
                assert roles == ["user", "assistant"], label
                outcomes["reply"] += 1
            app.query_one("#prompt", PromptInput).text = ""
    assert outcomes["error"] > 20 and sum(outcomes.values()) == len(cases)
