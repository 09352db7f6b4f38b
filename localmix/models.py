"""The model store: GGUF files in the store folder (what `quantize` writes and `pull` links), listed and
named. A model's name is its file name without `.gguf`; a split GGUF (`NAME-00001-of-00003.gguf` ...)
is one model named NAME, complete only when every part is there and checked (localmix.modelfile).

MODEL arguments accept a path, a store name, a unique prefix of one, or a hub REPO[:QUANT] already
pulled. This module asks nobody anything: a REPO[:QUANT] that is not in the store is a NotInStore error,
which a command may answer by offering to pull it."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .errors import LocalmixError, ModelFileError, NotInStore
from .modelfile import ModelFile, model_name, open_model_file, parse_split_name
from .paths import models_dir

REPO_SPEC = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?::(?P<quant>[\w.-]+))?$")
DEFAULT_QUANT = "Q4_K_M"


@dataclass
class StoredModel:
    name: str
    files: list[Path]  # what is in the folder under this name (all parts of a split model)
    model: ModelFile | None  # None when the files are damaged or incomplete
    error: str | None = None

    @property
    def path(self) -> Path:
        """The file llama.cpp opens (part 1 of a split model)."""
        return self.model.path if self.model else self.files[0]

    @property
    def size(self) -> int:
        return sum(p.stat().st_size for p in self.files if p.exists())


def _entries(folder: Path | None = None) -> list[tuple[str, list[Path]]]:
    """(name, files) of each model in the store, from file names alone (nothing is opened)."""
    groups: dict[str, list[Path]] = {}
    for p in sorted((folder or models_dir()).glob("*.gguf")):
        groups.setdefault(model_name(p), []).append(p)
    out = []
    for name, files in groups.items():
        singles = [p for p in files if not parse_split_name(p.name)]
        out += [(name, [p]) for p in singles]  # NAME.gguf beside NAME-0000x-of-0000y.gguf: two models of one name
        if len(singles) < len(files):
            out.append((name, [p for p in files if parse_split_name(p.name)]))
    return sorted(out, key=lambda e: e[0].lower())


def stored_models(folder: Path | None = None) -> list[StoredModel]:
    """Every model in the store, each opened and checked; a damaged or incomplete one carries its error."""
    return [_open(name, files) for name, files in _entries(folder)]


def _open(name: str, files: list[Path]) -> StoredModel:
    try:
        return StoredModel(name, files, open_model_file(files[0]))
    except ModelFileError as e:
        return StoredModel(name, files, None, str(e).removeprefix(f"{files[0]}: "))


def pulled_names(repo: str, quant: str) -> tuple[str, ...]:
    """The store names `pull REPO QUANT` gives (or gave, before names were shortened)."""
    name = re.sub(r"(?i)-gguf$", "", repo.split("/")[-1])
    if quant.lower().endswith(".gguf"):
        return (model_name(Path(quant.split("/")[-1])),)
    return f"{name}-{quant.upper()}", f"{repo.replace('/', '--')}-{quant.upper()}"


def find(name: str, entries: list[tuple[str, list[Path]]] | None = None) -> StoredModel | None:
    """The complete stored model called `name` (any case), or None. Only that model is opened."""
    matches = (_open(n, files) for n, files in (_entries() if entries is None else entries) if n.lower() == name.lower())
    return next((m for m in matches if m.model is not None), None)


def resolve_model(spec: str) -> Path:
    """A MODEL argument to the file llama.cpp opens: an existing path, a store name or a unique prefix of
    one, or a hub REPO[:QUANT] that is in the store (NotInStore otherwise)."""
    path = Path(spec).expanduser()
    if path.exists() or spec.endswith(".gguf") or spec.startswith((".", "/", "~")):
        return path  # a path (a missing one is reported by whoever opens it)
    repo = REPO_SPEC.match(spec)
    if ":" in spec and not repo:
        return path
    entries = _entries()  # names first; only the model chosen is opened
    exact = [e for e in entries if e[0].lower() == spec.lower()]
    prefix = exact or [e for e in entries if e[0].lower().startswith(spec.lower())]
    if len(prefix) > 1:
        raise LocalmixError(f"{spec!r} matches several models: {', '.join(name for name, _ in prefix)}")
    if prefix:
        m = _open(*prefix[0])
        if m.model is None:
            raise ModelFileError(f"{m.name}: {m.error}")
        return m.path
    if repo:
        quant = repo.group("quant") or DEFAULT_QUANT
        for name in pulled_names(repo.group("repo"), quant):
            if m := find(name, entries):
                return m.path
        raise NotInStore(repo.group("repo"), quant)
    hint = f" (in the store: {', '.join(name for name, _ in entries)})" if entries else " (the store is empty: localmix pull REPO)"
    raise LocalmixError(f"no model {spec!r}: not a file and not in the store{hint}")
