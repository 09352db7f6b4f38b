"""SRC for `quantize`: a local checkpoint folder, or a Hugging Face repo id fetched with huggingface-hub
(only the files conversion reads; the normal HF cache, token and HF_HUB_OFFLINE apply)."""

from __future__ import annotations

import re
from pathlib import Path

from .errors import QuantizeError

# What conversion reads; the rest of a repo (PyTorch .bin/.pth, consolidated.*, images) is never fetched.
NEEDED = [
    "config.json",
    "model.safetensors.index.json",
    "model*.safetensors",
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "generation_config.json",
    "chat_template.jinja",
]
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve(src: str, revision: str | None = None) -> tuple[Path, dict]:
    """The local folder to read, and what to record about where it came from."""
    path = Path(src).expanduser()
    if path.exists():
        if not path.is_dir():
            raise QuantizeError(f"{src} is a file; quantize needs a checkpoint folder or a hub repo id")
        return path, {}
    if not REPO_ID.match(src):
        raise QuantizeError(f"{src}: no such folder, and not a hub repo id (like mistralai/Mixtral-8x7B-Instruct-v0.1)")
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(src, revision=revision, allow_patterns=NEEDED))
    except Exception as e:  # noqa: BLE001 - mapped to one line, or re-raised as it is
        raise hub_error(e, src, revision) from None
    return folder, {"repo": src, "revision": folder.name}


def hub_error(e: Exception, repo: str, revision: str | None = None, what: str = "download") -> Exception:
    """The one-line error for a huggingface-hub failure (the exception itself when it is not one)."""
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    # Order matters: subclasses first (the specific errors derive from HfHubHTTPError, the local one
    # from EntryNotFoundError).
    messages = [
        (GatedRepoError, f"{repo} is gated: accept its terms on the hub and log in (hf auth login or HF_TOKEN)"),
        (RepositoryNotFoundError, f"{repo}: no such repo on the hub (or it is private and you are not logged in)"),
        (RevisionNotFoundError, f"{repo}: no revision {revision}"),
        (LocalEntryNotFoundError, f"{repo} is not in the local Hugging Face cache and the hub cannot be reached (offline?)"),
        (EntryNotFoundError, f"{repo}: a file is not on the hub"),
        (HfHubHTTPError, f"{repo}: {what} failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}"),
        (OSError, f"{repo}: {what} failed: {e}"),
    ]
    for kind, message in messages:
        if isinstance(e, kind):
            return QuantizeError(message)
    return e
