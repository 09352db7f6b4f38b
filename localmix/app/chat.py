"""`localmix chat`: the Textual app. It knows conversations (localmix.store), the Backend interface and
its events (localmix.backends) and the conversation turn (localmix.reply, which trims the history to the
context and runs tools), nothing of llama.cpp. The model loads in a thread while the app is already
usable; a reply's events come from a thread through a queue that the UI drains RENDER_HZ times a second,
so generation never waits for rendering. While it streams, a reply is plain text (LiveText: one widget, no
Markdown parsing, redrawn at most RENDER_HZ times a second); it becomes Markdown once, when it ends. On a
2-core machine the UI's CPU is taken from llama.cpp's decode threads, which wait for each other.

A reply is saved while it streams (a store Draft, marked incomplete), so a crash keeps what was shown;
reopened, it is marked as cut off and Ctrl+R writes it again. No error of a reply (the model's template,
the context, llama.cpp, a tool) and no failing action ends the app: each is a line in the conversation.
Text from files and from users (model names, titles, errors quoting them) is never read as markup."""

from __future__ import annotations

import functools
import inspect
import json
import queue
import re
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

from textual import on
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.command import DiscoveryHit, Hit, Hits, Provider
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message as TMessage
from textual.widgets import Footer, Label, ListItem, ListView, Markdown, ProgressBar, Static, TextArea

from quantize.errors import Error

from ..backends import Done, Sampling, Text, ToolCalls, ToolResult, Trimmed
from ..reply import reply
from ..store import Chat, Store
from ..text import shown
from .screens import ConfirmScreen, HelpScreen, ModelPicker, RenameScreen, SettingsScreen

DEFAULT_SYSTEM = ""
# How often streamed text is rendered: up to RENDER_HZ times a second, but slower when rendering is
# costly, so that the UI thread's CPU time stays under UI_SHARE of the time (on a small machine the
# cores that render are the cores that generate; Markdown rendering also holds the GIL).
RENDER_HZ = 10
UI_SHARE = 0.03


@dataclass(frozen=True)
class _Confirm:
    """The generation thread asks whether a tool with side effects may run; it waits on `decided`."""

    call: dict
    answer: list
    decided: threading.Event


@dataclass(frozen=True)
class _Failed:
    """The generation thread stopped with an error."""

    message: str


def error_text(e: BaseException) -> str:
    """An error as one line for the conversation: expected ones (quantize.errors.Error: the template,
    the context, the model file, a tool) by their message, anything else with its type, as a bug."""
    if isinstance(e, Error):
        return shown(str(e) or type(e).__name__, 500)
    return shown(f"unexpected {type(e).__name__}: {e}", 500)


def guarded(method):
    """An action or handler whose failure becomes an error line in the app instead of ending it."""
    if inspect.iscoroutinefunction(method):
        @functools.wraps(method)
        async def run(self, *args, **kw):
            try:
                return await method(self, *args, **kw)
            except Exception as e:  # noqa: BLE001 - the app and its chats stay; the error is shown
                self.failed(e)
    else:
        @functools.wraps(method)
        def run(self, *args, **kw):
            try:
                return method(self, *args, **kw)
            except Exception as e:  # noqa: BLE001 - as above
                self.failed(e)
    return run


CODE_BLOCK = re.compile(r"```[^\n]*\n(.*?)```", re.S)


def for_display(text: str) -> str:
    """Markdown with the model's line breaks kept (a poem, an address), code blocks untouched."""
    parts = re.split(r"(```.*?(?:```|$))", text, flags=re.S)
    return "".join(p if p.startswith("```") else re.sub(r"(?<!\n)\n(?!\n)", "  \n", p) for p in parts)

# (action, title, help) for the command palette; every action also has a key (see HelpScreen).
ACTIONS = [
    ("new_chat", "New chat", "Start a new conversation"),
    ("regenerate", "Regenerate reply", "Generate the last reply again"),
    ("edit_last", "Edit last message", "Put the last message back in the input"),
    ("stop", "Stop reply", "Stop the reply being generated"),
    ("copy_reply", "Copy last reply", "Copy the last reply to the clipboard"),
    ("copy_code", "Copy last code block", "Copy the last code block of the last reply"),
    ("rename_chat", "Rename chat", "Rename this conversation"),
    ("delete_chat", "Delete chat", "Delete this conversation"),
    ("export_chat", "Export chat to Markdown", "Write this conversation to a Markdown file"),
    ("settings", "Settings", "System prompt and sampling for this chat"),
    ("help", "Help", "Keys"),
]


class ChatCommands(Provider):
    async def discover(self) -> Hits:
        for action, title, help_text in ACTIONS:
            yield DiscoveryHit(title, partial(self.app.run_action, action), help=help_text)

    async def search(self, query: str) -> Hits:
        matcher = self.matcher(query)
        for action, title, help_text in ACTIONS:
            if (score := matcher.match(title)) > 0:
                yield Hit(score, matcher.highlight(title), partial(self.app.run_action, action), help=help_text)


class PromptInput(TextArea):
    """Enter sends; Shift+Enter or Ctrl+J inserts a new line; Up on an empty prompt edits the last message."""

    class Submitted(TMessage):
        def __init__(self, text: str):
            super().__init__()
            self.text = text

    async def _on_key(self, event) -> None:
        if event.key == "up" and not self.text:  # as in most chat apps: Up on an empty prompt edits the last message
            event.stop()
            event.prevent_default()
            self.app.action_edit_last()
        elif event.key == "enter":
            event.stop()
            event.prevent_default()
            self.post_message(self.Submitted(self.text))
        elif event.key in ("shift+enter", "ctrl+j"):
            event.stop()
            event.prevent_default()
            self.insert("\n")


def describe_call(call: dict, result: str | None = None) -> str:
    args = json.dumps(call["arguments"], ensure_ascii=False)
    return f"`{call['name']}({args})`" + (f" → `{result}`" if result is not None else " …")


CUT_OFF = "cut off: this reply was never finished (Ctrl+R writes it again)"


class LiveText(Static):
    """A reply as it streams: its text so far, plain (no markup, no Markdown), one widget whatever its
    length. `shown` counts its redraws."""

    def __init__(self):
        super().__init__("", markup=False, classes="live")
        self.shown = 0

    def show(self, text: str) -> None:
        self.shown += 1
        self.update(text)


class MessageView(Vertical):
    def __init__(self, role: str, content: str = "", message_id: int | None = None, *, complete: bool = True,
                 streaming: bool = False):
        super().__init__(classes=f"message {role}")
        self.role, self.content, self.message_id, self.complete = role, content, message_id, complete
        self.streaming = streaming  # a reply being written: its text goes to a LiveText until it ends

    def compose(self) -> ComposeResult:
        yield Label({"user": "You", "assistant": "Model", "system": "System", "tool": "Tool call"}.get(self.role, self.role),
                    classes="role")
        yield Markdown(for_display(self.content))
        if self.streaming:
            yield LiveText()
        if not self.complete:
            yield Static(CUT_OFF, classes="cutoff", markup=False)

    @property
    def markdown(self) -> Markdown:
        return self.query_one(Markdown)

    @property
    def live(self) -> LiveText:
        return self.query_one(LiveText)

    def content_text(self) -> str:
        return self.markdown.source


class ChatApp(App):
    TITLE = "localmix chat"
    COMMANDS = App.COMMANDS | {ChatCommands}
    CSS = """
    #sidebar { width: 28; border-right: solid $primary-darken-2; }
    Horizontal { height: 1fr; }
    #chats { height: 1fr; }
    #main { width: 1fr; }
    #log { height: 1fr; padding: 0 1; }
    .message { height: auto; margin: 0 0 1 0; }
    .message .role { text-style: bold; color: $accent; }
    .message.user .role { color: $success; }
    .notice { color: $warning; margin: 0 0 1 0; }
    .error { color: $error; margin: 0 0 1 0; }
    .cutoff { color: $warning; text-style: italic; }
    #prompt { height: 5; border: round $primary; }
    #loading { height: auto; padding: 0 1; }
    #status { height: 1; background: $primary-darken-3; padding: 0 1; }
    #dialog { width: 70; height: auto; border: thick $primary; background: $surface; padding: 1 2; }
    #sampling { grid-size: 2; height: auto; grid-columns: 22 1fr; }
    #system { height: 6; }
    ModalScreen { align: center middle; }
    """
    BINDINGS = [
        Binding("escape", "stop", "Stop", show=False),
        Binding("ctrl+r", "regenerate", "Regenerate"),
        # The prompt is a TextArea, which keeps its editing keys (Ctrl+A/E/K/D/X/Y/Z...): app keys avoid them.
        Binding("f4", "edit_last", "Edit last"),
        Binding("f6", "copy_reply", "Copy reply"),
        Binding("f7", "copy_code", "Copy code", show=False),
        Binding("ctrl+n", "new_chat", "New chat"),
        Binding("f8", "delete_chat", "Delete chat", show=False),
        Binding("f2", "rename_chat", "Rename", show=False),
        Binding("ctrl+s", "export_chat", "Export", show=False),
        Binding("f3", "settings", "Settings"),
        Binding("f1", "help", "Help"),
        Binding("ctrl+q", "quit", "Quit"),
    ]

    def __init__(self, prepare: Callable, store: Store, model_label: str, *, system: str | None = None,
                 demo: bool = False, exports: Path | None = None, choices: list[tuple[str, str]] | None = None,
                 toolset=None):
        """prepare(progress, path) -> (backend, {"split": "45%/55% CPU/GPU", "summary": one line on the
        plan}) runs in a thread: it builds or finds the model (path None: the default one) and loads it;
        progress(fraction, what) reports along the way. A served model's placement also has "model", its
        name (known once connected); its split says where it runs ("server HOST:PORT · ...").
        With `choices` ((label, path) pairs) the user picks the model first."""
        super().__init__()
        self.choices = choices
        self.toolset = toolset  # localmix.tools.ToolSet: the model may call these
        self.prepare, self.store, self.model_label = prepare, store, model_label
        self.default_system, self.demo, self.exports = system, demo, exports
        self.backend = None
        self.placement: dict = {}
        self.load_error: str | None = None
        self.chat: Chat | None = None
        self.generating = False
        self._events: queue.Queue = queue.Queue()
        self._reply: MessageView | None = None
        self._draft = None  # the store's Draft of the reply being written
        self._thread: threading.Thread | None = None  # the reply's thread
        self._sent = None  # the user message this reply answers, when it was sent just now (put back on failure)
        self._reply_text = self._pending = ""
        self._render_due = 0.0
        self._prompt: PromptInput | None = None  # the prompt, whose cursor stops blinking while a reply streams
        self._ui_cpu = 0.0
        self.last_stats = None

    # -- layout and start-up ----------------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        with Horizontal():
            with Vertical(id="sidebar"):
                yield Label("[b]Chats[/b]  (Ctrl+N new)")
                yield ListView(id="chats")
            with Vertical(id="main"):
                with Vertical(id="loading"):
                    yield Label("Loading model...", id="loading-label")
                    yield ProgressBar(total=1.0, show_eta=False, id="progress")
                yield VerticalScroll(id="log")
                yield PromptInput(id="prompt", soft_wrap=True, show_line_numbers=False)
        yield Static("", id="status", markup=False)
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#log", VerticalScroll).anchor()
        chat = self.store.last_chat()
        if chat is None or self.default_system is not None:
            chat = self.store.new_chat(model=self.model_label, system=self.default_system or DEFAULT_SYSTEM)
        self.refresh_chat_list()
        self.show_chat(chat)
        self.query_one("#prompt", PromptInput).focus()
        self.set_interval(1 / RENDER_HZ, self.drain)
        self.cut_off_notice()
        if self.demo:
            self.notify("This is a small demo model. " + "For Mixtral: localmix quantize mistralai/Mixtral-8x7B-Instruct-v0.1",
                        title="Demo model", timeout=8)
        if self.choices:
            self.push_screen(ModelPicker(self.choices), self._picked)
        else:
            self._start_load(None)
        self.update_status()

    def _picked(self, path: str | None) -> None:
        if path is None:
            self.exit(message="No model chosen.")
            return
        self.model_label = next(label for label, p in self.choices if p == path)  # shown through shown()
        self._start_load(path)

    def _start_load(self, path: str | None) -> None:
        threading.Thread(target=self._load, args=(path,), daemon=True).start()

    def _load(self, path: str | None) -> None:
        def progress(fraction: float, what: str = "Loading model") -> None:
            self.call_from_thread(self._show_progress, fraction, what)

        try:
            backend, placement = self.prepare(progress, path)
        except BaseException as e:  # noqa: BLE001 - any load failure is shown in the app; the app and the chats stay
            self.call_from_thread(self._loaded, None, {}, error_text(e))
            return
        self.call_from_thread(self._loaded, backend, placement, None)

    def _show_progress(self, fraction: float, what: str) -> None:
        self.query_one("#loading-label", Label).update(f"{what}...")
        self.query_one("#progress", ProgressBar).update(progress=fraction)

    def _loaded(self, backend, placement: dict, error: str | None) -> None:
        self.query_one("#loading").display = False
        self.backend, self.placement, self.load_error = backend, placement, error
        if placement.get("model"):  # a server's model: its name is known once connected
            self.model_label = placement["model"]
        if error:
            self.mount_log(Static(f"The model could not be loaded: {error}", classes="error", markup=False))
        elif placement.get("summary"):
            self.notify(shown(placement["summary"], 500), title=f"{shown(self.model_label)} loaded", timeout=6, markup=False)
        self.update_status()

    # -- chats --------------------------------------------------------------------------------------------

    def refresh_chat_list(self) -> None:
        lv = self.query_one("#chats", ListView)
        lv.clear()
        for c in self.store.chats():
            lv.append(ListItem(Label(shown(c.title[:24]), markup=False), name=str(c.id)))

    def show_chat(self, chat: Chat) -> None:
        self.chat = chat
        log = self.query_one("#log", VerticalScroll)
        log.remove_children()
        results = {m.tool_call_id: m.content for m in self.store.messages(chat.id) if m.role == "tool"}
        for m in self.store.messages(chat.id):
            if m.tool_calls:
                for c in m.tool_calls:
                    log.mount(MessageView("tool", describe_call(c, results.get(c["id"])), m.id))
            elif m.role != "tool":
                log.mount(MessageView(m.role, m.content, m.id, complete=m.complete))
        self.sub_title = shown(chat.title)
        lv = self.query_one("#chats", ListView)
        for i, item in enumerate(lv.children):
            if item.name == str(chat.id):
                lv.index = i

    def cut_off_notice(self) -> None:
        msgs = self.store.messages(self.chat.id)
        if msgs and not msgs[-1].complete:
            self.notify("The last reply was never finished; Ctrl+R writes it again.", title="Reply cut off",
                        severity="warning", timeout=8)

    @on(ListView.Selected, "#chats")
    @guarded
    def _select_chat(self, event: ListView.Selected) -> None:
        if self.generating:
            self.notify("Wait for the reply to finish (Esc stops it).")
            return
        chat = self.store.chat(int(event.item.name))
        if chat and (self.chat is None or chat.id != self.chat.id):
            self.show_chat(chat)

    @guarded
    def action_new_chat(self) -> None:
        if self.generating:
            return
        chat = self.store.new_chat(model=self.model_label, system=self.default_system or DEFAULT_SYSTEM)
        self.refresh_chat_list()
        self.show_chat(chat)

    @guarded
    def action_delete_chat(self) -> None:
        if self.generating or self.chat is None:
            return
        self.store.delete_chat(self.chat.id)
        nxt = self.store.last_chat() or self.store.new_chat(model=self.model_label)
        self.refresh_chat_list()
        self.show_chat(nxt)
        self.notify("Chat deleted")

    def action_rename_chat(self) -> None:
        self.push_screen(RenameScreen(self.chat.title), self._renamed)

    @guarded
    def _renamed(self, title: str | None) -> None:
        if title:
            self.store.rename(self.chat.id, title)
            self.chat = self.store.chat(self.chat.id)
            self.sub_title = shown(title)
            self.refresh_chat_list()

    def action_settings(self) -> None:
        self.push_screen(SettingsScreen(self.chat), self._settings_saved)

    @guarded
    def _settings_saved(self, values: dict | None) -> None:
        if values:
            self.store.update_settings(self.chat.id, **values)
            self.chat = self.store.chat(self.chat.id)
            self.notify("Settings saved for this chat")

    def action_help(self) -> None:
        self.push_screen(HelpScreen())

    @guarded
    def action_export_chat(self) -> None:
        folder = self.exports or Path.home()
        folder.mkdir(parents=True, exist_ok=True)
        safe = re.sub(r"[^\w.-]+", "-", self.chat.title).strip("-") or "chat"
        path = folder / f"{safe}-{self.chat.id}.md"
        path.write_text(self.store.export_markdown(self.chat.id), encoding="utf-8")
        self.notify(f"Exported to {path}")

    # -- sending and streaming ----------------------------------------------------------------------------

    def mount_log(self, widget) -> None:
        self.query_one("#log", VerticalScroll).mount(widget)

    def show_error(self, message: str) -> None:
        self.mount_log(Static(f"Error: {message}", classes="error", markup=False))

    def failed(self, e: BaseException) -> None:
        """What `guarded` does with an error: a line in the conversation (the app goes on)."""
        self.show_error(error_text(e))

    @on(PromptInput.Submitted)
    @guarded
    def _submitted(self, event: PromptInput.Submitted) -> None:
        text = event.text.strip()
        if not text:
            return
        if self.generating:
            self.notify("A reply is still being written (Esc stops it).")
            return
        if self.backend is None:
            self.notify(f"The model could not be loaded: {self.load_error}" if self.load_error else "The model is still loading.",
                        severity="error" if self.load_error else "warning")
            return
        self.query_one("#prompt", PromptInput).clear()
        if not self.store.messages(self.chat.id):
            self.store.rename(self.chat.id, text.splitlines()[0][:40])
            self.chat = self.store.chat(self.chat.id)
            self.sub_title = shown(self.chat.title)
            self.refresh_chat_list()
        m = self.store.add_message(self.chat.id, "user", text)
        self.mount_log(MessageView("user", text, m.id))
        self.generate(sent=m)

    def generate(self, sent=None) -> None:
        """Reply to the conversation so far, in a thread; its events reach the UI through the queue. `sent`:
        the user message just sent, taken back (into the prompt) if the reply fails before any text."""
        c = self.chat
        history = [m.as_prompt() for m in self.store.messages(c.id)]
        msgs = ([{"role": "system", "content": c.system}] if c.system else []) + history
        sampling = Sampling(max_tokens=c.max_tokens, temperature=c.temperature, top_p=c.top_p, seed=c.seed)
        self._reply = MessageView("assistant", streaming=True)
        self._draft, self._sent = self.store.draft(c.id), sent
        self._reply_text = self._pending = ""
        self._render_due, self._ui_cpu = 0.0, time.thread_time()
        self.mount_log(self._reply)
        self._prompt = self.query_one("#prompt", PromptInput)  # kept: a dialog may be on top when the reply ends
        self._prompt.cursor_blink = False  # a blink is a redraw: none while the model writes (the cursor stays shown)
        self.generating = True
        self.update_status("writing...")
        self._events = queue.Queue()  # one per reply: a thread that outlives its reply cannot feed the next one
        self._thread = threading.Thread(target=self._generate, args=(msgs, sampling, self._events), daemon=True)
        self._thread.start()

    def _generate(self, msgs: list[dict], sampling: Sampling, events: queue.Queue) -> None:
        def confirm(call: dict) -> bool:  # asked in the UI; this thread waits for the answer
            answer, decided = [], threading.Event()
            events.put(_Confirm(call, answer, decided))
            decided.wait()
            return bool(answer and answer[0])

        try:
            for event in reply(self.backend, msgs, sampling, toolset=self.toolset, confirm=confirm, fit=True):
                events.put(event)
        except BaseException as e:  # noqa: BLE001 - shown in the app; the partial reply is kept (SystemExit too:
            events.put(_Failed(error_text(e)))  # in a thread it would end the reply without a word)

    async def drain(self) -> None:
        if self._reply is None:
            return
        try:
            await self._drain()
        except Exception as e:  # noqa: BLE001 - the reply ends with the error shown; the app goes on
            if self.backend is not None:
                self.backend.cancel()
            if self._reply is None:  # it failed while finishing
                self.failed(e)
                return
            self._reply_text += self._pending
            self._pending = ""
            await self._finish(_Failed(error_text(e)))

    def _waiting(self):
        """The reply's events that have arrived, one at a time (taken as they are iterated)."""
        while True:
            try:
                yield self._events.get_nowait()
            except queue.Empty:
                return

    async def _drain(self) -> None:
        end = None
        for event in self._waiting():
            if isinstance(event, Text):
                self._reply_text += event.text
                self._pending += event.text
            elif isinstance(event, (Done, _Failed)):
                end = event
                break
            else:  # the rest comes in order with the text around it
                await self._handle(event)
        if end is None:
            self._draft.update(self._reply_text)  # saved every SAVE_EVERY seconds: a crash keeps what was shown
        now = time.perf_counter()
        if self._pending and now >= self._render_due and end is None and self._reply.is_mounted:
            self._reply.live.show(self._reply_text)  # the whole text: one cheap update however many pieces came
            self._pending = ""
            spent = time.thread_time() - self._ui_cpu  # UI CPU since the last render, compositing included
            self._ui_cpu = time.thread_time()
            self._render_due = now + min(1.0, max(1 / RENDER_HZ, spent / UI_SHARE))
        if end is not None:
            await self._finish(end)

    async def _handle(self, event) -> None:
        log = self.query_one("#log", VerticalScroll)
        if isinstance(event, Trimmed):
            await log.mount(Static(f"{event.dropped} earlier message(s) left out of the prompt: the conversation "
                                   f"outgrew the {self.backend.ctx}-token context.", classes="notice"), before=self._reply)
        elif isinstance(event, ToolCalls):  # the text streamed so far was the call itself: show calls instead
            self._reply_text = self._pending = ""
            self._draft.discard()
            self._sent = None  # the conversation went on: the message stays
            if self._reply.is_mounted:
                self._reply.live.show("")
            m = self.store.add_message(self.chat.id, "assistant", "", tool_calls=event.calls)
            for c in event.calls:
                view = MessageView("tool", describe_call(c), m.id)
                view.call_id = c["id"]
                await log.mount(view, before=self._reply)
        elif isinstance(event, ToolResult):
            call = event.call
            self.store.add_message(self.chat.id, "tool", event.result, tool_call_id=call["id"], name=call["name"])
            for view in self.query(MessageView):
                if getattr(view, "call_id", None) == call["id"]:
                    await view.markdown.update(describe_call(call, event.result))
        elif isinstance(event, _Confirm):

            def decided(ok: bool) -> None:
                event.answer.append(ok)
                event.decided.set()

            self.push_screen(ConfirmScreen(f"The model wants to run {shown(describe_call(event.call), 500)}.\n"
                                           f"{shown(event.call['name'])} has side effects. Run it?"), decided)

    async def _finish(self, end) -> None:
        """The reply is over: saved complete (or cut off, after an error), the error shown. A reply that
        failed before any text takes back the message it answered: it returns to the prompt, so retries
        never pile up user messages."""
        view, text = self._reply, self._reply_text
        self._reply, self.generating = None, False
        self._prompt.cursor_blink = True
        failed = isinstance(end, _Failed)
        stats = None if failed else end.stats
        self.last_stats = stats or self.last_stats
        try:
            view.message_id = self._draft.finish(text, asdict(stats) if stats else None, complete=not failed)
            if failed and not text and self._sent is not None:
                self.take_back(self._sent)
        finally:
            if failed:
                self.show_error(end.message)
            elif stats.stop == "cancelled":
                self.notify("Stopped; the reply so far is kept.")
            self.update_status()
            if text:
                view.streaming = False
                await view.markdown.update(for_display(text))  # the one Markdown render, the whole text, line breaks kept
                await view.live.remove()
            else:
                await view.remove()

    def take_back(self, message) -> None:
        """A sent message whose reply failed at once: out of the chat, back into the prompt (if empty)."""
        msgs = self.store.messages(self.chat.id)
        if not msgs or msgs[-1].id != message.id:
            return
        self.store.delete_message(message.id)
        self._remove_views_from(message.id)
        prompt = self.query_one("#prompt", PromptInput)
        if not prompt.text:
            prompt.text = message.content

    def stop_generating(self, timeout: float = 10.0) -> bool:
        """After the app has ended (quit mid-reply): stop the reply, wait for its thread, and save the text
        it wrote, still marked incomplete. False if the thread still runs: the backend must stay open."""
        if self._thread is None or not self._thread.is_alive():
            return True
        if self.backend is not None:
            self.backend.cancel()
        end = time.monotonic() + timeout
        while True:
            self._thread.join(0.05)
            for event in self._waiting():
                if isinstance(event, Text):
                    self._reply_text += event.text
                elif isinstance(event, _Confirm):  # a tool call nobody will answer: not run
                    event.answer.append(False)
                    event.decided.set()
            if not self._thread.is_alive() or time.monotonic() > end:
                break
        if self._reply is not None and self._draft is not None:
            self._draft.update(self._reply_text, force=True)
        return not self._thread.is_alive()

    def action_stop(self) -> None:
        if self.generating and self.backend is not None:
            self.backend.cancel()

    def _last(self, role: str):
        msgs = self.store.messages(self.chat.id)
        return next((m for m in reversed(msgs) if m.role == role), None), msgs

    def _remove_views_from(self, message_id: int) -> None:
        for view in list(self.query(MessageView)):
            if view.message_id is not None and view.message_id >= message_id:
                view.remove()

    @guarded
    def action_regenerate(self) -> None:
        """The last reply again; with none after the last message (a crash before its first word, a
        failure), the missing reply."""
        if self.generating or self.backend is None:
            return
        msgs = self.store.messages(self.chat.id)
        if not msgs:
            self.notify("No reply to regenerate.")
            return
        if msgs[-1].role == "assistant" and not msgs[-1].tool_calls:
            self.store.delete_message(msgs[-1].id)
            self._remove_views_from(msgs[-1].id)
        self.generate()

    @guarded
    def action_edit_last(self) -> None:
        if self.generating:
            return
        last_user, msgs = self._last("user")
        if last_user is None:
            return
        for m in msgs:
            if m.id >= last_user.id:
                self.store.delete_message(m.id)
        self._remove_views_from(last_user.id)
        prompt = self.query_one("#prompt", PromptInput)
        prompt.text = last_user.content
        prompt.focus()

    def action_copy_reply(self) -> None:
        last, _ = self._last("assistant")
        if last:
            self.copy_to_clipboard(last.content)
            self.notify("Reply copied")

    def action_copy_code(self) -> None:
        last, _ = self._last("assistant")
        blocks = CODE_BLOCK.findall(last.content) if last else []
        if blocks:
            self.copy_to_clipboard(blocks[-1])
            self.notify("Code block copied")
        else:
            self.notify("No code block in the last reply")

    # -- status bar ---------------------------------------------------------------------------------------

    def update_status(self, state: str = "") -> None:
        parts = [shown(self.model_label) + (" (demo)" if self.demo else "")]
        if self.placement.get("split"):
            parts.append(self.placement["split"])
        elif self.load_error:
            parts.append("not loaded")
        elif self.backend is None:
            parts.append("loading...")
        s = self.last_stats
        if s is not None:
            parts.append(f"ctx {s.ctx_used}/{s.ctx_total}" if s.ctx_total else f"ctx {s.ctx_used}")  # 0: a server that does not say
            parts.append(f"{s.gen_tps:.1f} tok/s")
            parts.append(f"TTFT {s.ttft:.2f}s")
        if state:
            parts.append(state)
        self.query_one("#status", Static).update(" · ".join(parts))
