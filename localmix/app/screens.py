"""Modal screens of the chat app: help, settings, rename, model picker. Names from files and a model's
tool calls are shown as text, never read as markup."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Grid, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, ListItem, ListView, Static, TextArea

from ..text import shown

HELP = """\
[b]Keys[/b]

  Enter        send            Ctrl+J / Shift+Enter  new line
  Esc          stop the reply, keeping what was generated
  Ctrl+R       regenerate the last reply, or one that was cut off
  F4, or Up on an empty prompt   edit and resend the last message
  F6           copy the last reply      F7      copy its last code block
  Ctrl+N       new chat                 F8      delete this chat
  F2           rename this chat         Ctrl+S  export this chat to Markdown
  F3           settings (system prompt, sampling)
  Ctrl+P       command palette          F1      this help
  Ctrl+Q       quit

  In the prompt, the usual editing keys work (Ctrl+A/E line start/end,
  Ctrl+K/U delete to end/start, Ctrl+Z undo, Ctrl+X/C/V cut/copy/paste).
"""


class HelpScreen(ModalScreen[None]):
    BINDINGS = [("escape,f1,q", "dismiss", "Close")]

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Static(HELP)
            yield Button("Close", id="close")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss()


class RenameScreen(ModalScreen[str | None]):
    BINDINGS = [("escape", "dismiss(None)", "Cancel")]

    def __init__(self, title: str):
        super().__init__()
        self.title_text = title

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Label("Rename chat")
            yield Input(self.title_text, id="title")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.dismiss(event.value.strip() or None)


class SettingsScreen(ModalScreen[dict | None]):
    """Per-chat system prompt and sampling."""

    BINDINGS = [("escape", "dismiss(None)", "Cancel")]

    def __init__(self, chat):
        super().__init__()
        self.chat = chat

    def compose(self) -> ComposeResult:
        c = self.chat
        with Vertical(id="dialog"):
            yield Label("System prompt")
            yield TextArea(c.system, id="system")
            with Grid(id="sampling"):
                yield Label("Temperature")
                yield Input(str(c.temperature), id="temperature")
                yield Label("Top-p")
                yield Input(str(c.top_p), id="top_p")
                yield Label("Max tokens")
                yield Input(str(c.max_tokens), id="max_tokens")
                yield Label("Seed (empty: random)")
                yield Input("" if c.seed is None else str(c.seed), id="seed")
            yield Label("", id="error")
            yield Button("Save", id="save", variant="primary")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        try:
            values = {
                "system": self.query_one("#system", TextArea).text,
                "temperature": float(self.query_one("#temperature", Input).value),
                "top_p": float(self.query_one("#top_p", Input).value),
                "max_tokens": int(self.query_one("#max_tokens", Input).value),
                "seed": int(s) if (s := self.query_one("#seed", Input).value.strip()) else None,
            }
        except ValueError:
            self.query_one("#error", Label).update("[red]numbers only in the sampling fields[/]")
            return
        if not (0 <= values["temperature"] <= 5 and 0 < values["top_p"] <= 1 and values["max_tokens"] > 0):
            self.query_one("#error", Label).update("[red]temperature 0-5, top-p in (0, 1], max tokens > 0[/]")
            return
        self.dismiss(values)


class ModelPicker(ModalScreen[str | None]):
    BINDINGS = [("escape", "dismiss(None)", "Cancel")]

    def __init__(self, models: list[tuple[str, str]]):
        super().__init__()
        self.models = models  # (label, path)

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Label("Choose a model")
            yield ListView(*[ListItem(Label(shown(label), markup=False), name=path) for label, path in self.models], id="models")

    def on_list_view_selected(self, event: ListView.Selected) -> None:
        self.dismiss(event.item.name)


class ConfirmScreen(ModalScreen[bool]):
    """Asks before a tool with side effects runs."""

    BINDINGS = [("y", "dismiss(True)", "Yes"), ("n,escape", "dismiss(False)", "No")]

    def __init__(self, question: str):
        super().__init__()
        self.question = question

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Static(self.question, markup=False)
            yield Button("Run it (y)", id="yes", variant="warning")
            yield Button("Don't (n)", id="no")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")
