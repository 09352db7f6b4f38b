"""The model store: GGUF files in the store folder (what `quantize` writes), listed and named.

A model's name is its file name without `.gguf`; a split GGUF (`NAME-00001-of-00003.gguf`) is one model
named NAME. MODEL arguments accept a path, a store name, or a unique prefix of one."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError
from .paths import models_dir

SPLIT = re.compile(r"^(?P<name>.+)-(?P<part>\d{5})-of-(?P<count>\d{5})\.gguf$")


@dataclass
class StoredModel:
    name: str
    path: Path  # the file llama.cpp opens (the first part of a split model)
    parts: list[Path]

    @property
    def size(self) -> int:
        return sum(p.stat().st_size for p in self.parts)


def stored_models(folder: Path | None = None) -> list[StoredModel]:
    folder = folder or models_dir()
    splits: dict[str, list[Path]] = {}
    out = []
    for p in sorted(folder.glob("*.gguf")):
        m = SPLIT.match(p.name)
        if m:
            splits.setdefault(m.group("name"), []).append(p)
        else:
            out.append(StoredModel(p.name.removesuffix(".gguf"), p, [p]))
    for name, parts in splits.items():
        parts.sort()
        out.append(StoredModel(name, parts[0], parts))
    return sorted(out, key=lambda m: m.name.lower())


def resolve_model(spec: str) -> Path:
    """A MODEL argument to a file: an existing path, a store name, a unique prefix of one, or a hub
    REPO[:QUANT] (pulled when missing, after asking in a terminal)."""
    path = Path(spec).expanduser()
    if path.exists() or spec.endswith(".gguf") or spec.startswith((".", "/", "~")):
        return path  # a path (a missing one is reported by whoever opens it)
    if ":" in spec and not REPO_SPEC.match(spec):
        return path
    models = stored_models()
    exact = [m for m in models if m.name == spec or m.name.lower() == spec.lower()]
    if exact:
        return exact[0].path
    prefix = [m for m in models if m.name.lower().startswith(spec.lower())]
    if len(prefix) == 1:
        return prefix[0].path
    if len(prefix) > 1:
        raise UserError(f"{spec!r} matches several models: {', '.join(m.name for m in prefix)}")
    repo = REPO_SPEC.match(spec)
    if repo:
        return _pull_asking(repo.group("repo"), repo.group("quant") or "Q4_K_M")
    hint = f" (in the store: {', '.join(m.name for m in models)})" if models else " (the store is empty: localmix pull REPO)"
    raise UserError(f"no model {spec!r}: not a file and not in the store{hint}")


REPO_SPEC = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?::(?P<quant>[\w.-]+))?$")


def _pull_asking(repo: str, quant: str) -> Path:
    """REPO[:QUANT] given where a model is expected: the stored pull if there is one, else pull it
    (after asking, in a terminal)."""
    import sys

    name = re.sub(r"(?i)-gguf$", "", repo.split("/")[-1])
    for m in stored_models():
        if m.name.lower() in (f"{name}-{quant}".lower(), f"{repo.replace('/', '--')}-{quant}".lower()):
            return m.path
    if not sys.stdin.isatty():
        raise UserError(f"{repo}:{quant} is not in the store; fetch it with: localmix pull {repo} {quant}")
    answer = input(f"{repo} ({quant}) is not in the store. Pull it now? [Y/n] ")
    if answer.strip().lower() not in ("", "y", "yes"):
        raise UserError("not pulled")
    from .commands.pull import pull

    return pull(repo, quant)
