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
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        folder = Path(snapshot_download(src, revision=revision, allow_patterns=NEEDED))
    except GatedRepoError:
        raise QuantizeError(f"{src} is gated: accept its terms on the hub and log in (hf auth login or HF_TOKEN)") from None
    except RepositoryNotFoundError:
        raise QuantizeError(f"{src}: no such repo on the hub (or it is private and you are not logged in)") from None
    except RevisionNotFoundError:
        raise QuantizeError(f"{src}: no revision {revision}") from None
    except LocalEntryNotFoundError:
        raise QuantizeError(f"{src} is not in the local Hugging Face cache and the hub cannot be reached (offline?)") from None
    except HfHubHTTPError as e:
        raise QuantizeError(f"{src}: download failed: {str(e).splitlines()[0]}") from None
    except OSError as e:
        raise QuantizeError(f"{src}: download failed: {e}") from None
    return folder, {"repo": src, "revision": folder.name}
