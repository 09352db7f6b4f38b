"""Where localmix keeps things: the model store (GGUF files) and caches. LOCALMIX_HOME moves all of it
(tests use it to stay out of the user's folders)."""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    if env := os.environ.get("LOCALMIX_HOME"):
        return Path(env)
    import platformdirs

    return Path(platformdirs.user_data_dir("localmix", appauthor=False))


def models_dir(create: bool = True) -> Path:
    d = home() / "models"
    if create:
        d.mkdir(parents=True, exist_ok=True)
    return d


def cache_dir() -> Path:
    if env := os.environ.get("LOCALMIX_HOME"):
        return Path(env) / "cache"
    import platformdirs

    return Path(platformdirs.user_cache_dir("localmix", appauthor=False))
