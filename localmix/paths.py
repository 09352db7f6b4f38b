"""Where localmix keeps things: the model store (GGUF files) and caches. LOCALMIX_HOME moves all of it
(tests use it to stay out of the user's folders). A home that is a file, or a folder that cannot be
made, is one line (LocalmixError), never a traceback from whoever creates something in it first."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import LocalmixError
from .text import shown


def home() -> Path:
    if env := os.environ.get("LOCALMIX_HOME"):
        path = Path(env).expanduser().absolute()
        if _exists(path) and not path.is_dir():
            raise LocalmixError(f"LOCALMIX_HOME={shown(env)} is not a folder; point it to a folder (or unset it)")
        return path
    import platformdirs

    return Path(platformdirs.user_data_dir("localmix", appauthor=False))


def _exists(path: Path) -> bool:
    """Something is at `path`, a dangling link included (Path.exists follows links)."""
    try:
        os.lstat(path)
        return True
    except OSError:
        return False


def ensure_dir(path: Path, what: str) -> Path:
    """`path` as an existing folder, made if needed; one line if it cannot be (a file in the way, no permission)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise LocalmixError(f"{what} {shown(path)} is not a folder (a file is in the way)") from None
    except OSError as e:
        raise LocalmixError(f"cannot make {what} {shown(path)}: {e.strerror or e}") from None
    return path


def models_dir(create: bool = True) -> Path:
    d = home() / "models"
    return ensure_dir(d, "the model store") if create else d


def cache_dir() -> Path:
    if os.environ.get("LOCALMIX_HOME"):
        return home() / "cache"
    import platformdirs

    return Path(platformdirs.user_cache_dir("localmix", appauthor=False))


def rpc_cache_dir() -> Path:
    """Where `localmix worker` keeps the tensors clients sent it (by hash), so later loads send only hashes."""
    return cache_dir() / "rpc"
