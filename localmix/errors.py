"""The runtime's expected failures. All derive from `quantize.errors.Error`, the one base class the CLI
turns into a single line and exit status 1 (localmix/cli.py); nothing else catches them to re-word them.
Subclasses exist where a caller does something different with them (asks to pull, stops a reply)."""

from quantize.errors import Error


class LocalmixError(Error):
    """An expected failure of the runtime; the message is one line, for the user."""


class ModelFileError(LocalmixError):
    """A GGUF that is missing, damaged, incomplete (a split model without all its parts) or not a GGUF."""


class NotInStore(LocalmixError):
    """A hub REPO[:QUANT] was named where a model is expected, and the store does not have it. Commands
    may offer to pull it; below them it is only an error."""

    def __init__(self, repo: str, quant: str):
        super().__init__(f"{repo}:{quant} is not in the store; fetch it with: localmix pull {repo} {quant}")
        self.repo, self.quant = repo, quant


class DoesNotFit(LocalmixError):
    """The model and its context do not fit the memory budget."""


class TemplateError(LocalmixError):
    """The model's chat template does not compile, or rejects the conversation."""


class ContextFull(LocalmixError):
    """The prompt does not fit the context window."""


class ToolCallError(LocalmixError):
    """The model's tool call cannot be read, or the call-and-answer loop did not end in an answer."""


class WorkerError(LocalmixError):
    """A worker (`--rpc HOST:PORT`) that is not running, cannot be reached, speaks another RPC protocol
    version, or stopped answering during a load or a reply."""
