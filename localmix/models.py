"""The model store: GGUF files in the store folder (what `quantize` writes and `pull` links), listed and
named. A model's name is its file name without `.gguf`; a split GGUF (`NAME-00001-of-00003.gguf` ...)
is one model named NAME, complete only when every part is there and checked (localmix.modelfile).
Hidden files (`.NAME...`: partial downloads and outputs, links being made) are never models.

MODEL arguments accept a path, a store name, a store file name, a unique prefix of a name, or a hub
REPO[:QUANT] already pulled. Names are matched most exact first, and a rule that matches several models
refuses with the candidates rather than taking the first (`mixtral-Q4_K_M` never opens or removes
`Mixtral-Q4_K_M.gguf` while `mixtral-Q4_K_M.gguf` is there). Anything in the store that is not a readable
GGUF file (a link to a deleted file, a link loop, a folder named `x.gguf`) is a model with an error,
listed as broken. This module asks nobody anything: a REPO[:QUANT] that is not in the store is a
NotInStore error, which a command may answer by offering to pull it."""

from __future__ import annotations

import errno
import os
import re
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from quantize.errors import Error

from .errors import LocalmixError, ModelFileError, NotInStore
from .modelfile import ModelFile, model_name, open_model_file, parse_split_name
from .paths import models_dir
from .text import shown

REPO_SPEC = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?::(?P<quant>[\w.-]+))?$")
DEFAULT_QUANT = "Q4_K_M"
MAX_NAMED = 20  # names listed in one message

Entry = tuple[str, list[Path]]  # (name, files) as the folder has them; nothing opened


@dataclass
class StoredModel:
    name: str
    files: list[Path]  # what is in the folder under this name (all parts of a split model)
    model: ModelFile | None  # None when the files are damaged, incomplete, or not files at all
    error: str | None = None

    @property
    def path(self) -> Path:
        """The file llama.cpp opens (part 1 of a split model)."""
        return self.model.path if self.model else self.files[0]

    @property
    def size(self) -> int:
        return sum(st.st_size for p in self.files if (st := _stat(p)) and stat.S_ISREG(st.st_mode))


def _stat(path: Path) -> os.stat_result | None:
    try:
        return path.stat()
    except (OSError, ValueError):
        return None


def problem(path: Path) -> str | None:
    """Why `path` is not a readable file (a dangling link, a loop, a folder, a pipe), or None."""
    try:
        st = path.stat()
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "a link loop"
        if path.is_symlink():
            return f"a link to a missing file ({shown(os.readlink(path))})"
        return e.strerror or str(e)
    if stat.S_ISDIR(st.st_mode):
        return "a folder, not a GGUF file"
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    if not os.access(path, os.R_OK):
        return "not readable (permission denied)"
    return None


def _entries(folder: Path | None = None) -> list[Entry]:
    """(name, files) of each model in the store, from file names alone (nothing is opened)."""
    folder = folder or models_dir()
    try:
        # NAME.imatrix.gguf: an importance matrix `quantize --imatrix auto` saved beside its model, not a model
        names = sorted(n for n in os.listdir(folder) if n.endswith(".gguf") and not n.startswith(".") and not n.endswith(".imatrix.gguf"))
    except OSError as e:
        raise LocalmixError(f"cannot read the model store {shown(folder)}: {e.strerror or e}") from None
    groups: dict[str, list[Path]] = {}
    for n in names:
        groups.setdefault(model_name(Path(n)), []).append(folder / n)
    out = []
    for name, files in groups.items():
        singles = [p for p in files if not parse_split_name(p.name)]
        out += [(name, [p]) for p in singles]  # NAME.gguf beside NAME-0000x-of-0000y.gguf: two models of one name
        if len(singles) < len(files):
            out.append((name, [p for p in files if parse_split_name(p.name)]))
    return sorted(out, key=lambda e: (e[0].lower(), e[0], e[1][0].name))


def stored_models(folder: Path | None = None) -> list[StoredModel]:
    """Every model in the store, each opened and checked; a damaged or incomplete one carries its error."""
    return [_open(name, files) for name, files in _entries(folder)]


def _open(name: str, files: list[Path]) -> StoredModel:
    for p in files:
        if why := problem(p):
            return StoredModel(name, files, None, why if len(files) == 1 else f"{p.name}: {why}")
    try:
        return StoredModel(name, files, open_model_file(files[0]))
    except Error as e:  # ModelFileError, or whatever a check of the header refuses with
        return StoredModel(name, files, None, str(e).removeprefix(f"{files[0]}: "))
    except OSError as e:  # gone or unreadable since it was looked at
        return StoredModel(name, files, None, e.strerror or str(e))


# How a name picks a model, most exact first. The first rule that matches anything decides: one match
# is the model, several are refused with the candidates (never "the first one").
RULES: tuple[tuple[str, Callable[[str, Entry], bool]], ...] = (
    ("exactly", lambda spec, e: e[0] == spec),
    ("as a file name", lambda spec, e: any(p.name == spec for p in e[1])),
    ("only by case", lambda spec, e: e[0].lower() == spec.lower()),
    ("as a prefix", lambda spec, e: spec != "" and e[0].lower().startswith(spec.lower())),
)


def choose(spec: str, entries: list[Entry], prefixes: bool = True) -> Entry | None:
    """The one store entry `spec` names, None if none; LocalmixError if the deciding rule matches several."""
    for how, rule in RULES if prefixes else RULES[:-1]:
        found = [e for e in entries if rule(spec, e)]
        if len(found) > 1:
            which = "by its file name" if len({e[0] for e in found}) < len(found) else "exactly"
            raise LocalmixError(f"'{shown(spec)}' matches several models {how}: {candidates(found)}; name one {which}")
        if found:
            return found[0]
    return None


def candidates(entries: list[Entry]) -> str:
    """Names, or file names where two entries share a name, listed for a message."""
    names = [e[0] for e in entries]
    shown_names = [e[1][0].name if names.count(e[0]) > 1 else e[0] for e in entries]
    more = f" and {len(entries) - MAX_NAMED} more" if len(entries) > MAX_NAMED else ""
    return ", ".join(shown(n) for n in shown_names[:MAX_NAMED]) + more


def pulled_names(repo: str, quant: str) -> tuple[str, ...]:
    """The store names `pull REPO QUANT` gives (or gave, before names were shortened)."""
    name = re.sub(r"(?i)-gguf$", "", repo.split("/")[-1])
    if quant.lower().endswith(".gguf"):
        return (model_name(Path(quant.split("/")[-1])),)
    return f"{name}-{quant.upper()}", f"{repo.replace('/', '--')}-{quant.upper()}"


def find(name: str, entries: list[Entry] | None = None) -> StoredModel | None:
    """The complete stored model called `name` (exactly, else the only one of any case), or None.
    Only that model is opened."""
    chosen = choose(name, _entries() if entries is None else entries, prefixes=False)
    m = _open(*chosen) if chosen else None
    return m if m is not None and m.model is not None else None


def stored(spec: str, prefixes: bool = False) -> StoredModel:
    """The store entry a name (or file name) picks, complete or broken: what `rm` removes."""
    entries = _entries()
    chosen = choose(spec, entries, prefixes)
    if chosen is None:
        raise LocalmixError(f"no model '{shown(spec)}' in the store (see localmix list)")
    return _open(*chosen)


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except (OSError, ValueError):  # a name too long for the file system, a NUL
        return False


def resolve_model(spec: str) -> Path:
    """A MODEL argument to the file llama.cpp opens: an existing file, a store name, a store file name or
    a unique prefix of a name, or a hub REPO[:QUANT] that is in the store (NotInStore otherwise)."""
    path = Path(spec).expanduser()
    if _is_file(path) or spec.startswith((".", "/", "~")) or (spec.endswith(".gguf") and "/" in spec):
        return path  # a path (a missing one is reported by whoever opens it)
    repo = REPO_SPEC.match(spec)
    if (":" in spec or "/" in spec or os.sep in spec) and not repo:
        return path
    entries = _entries()  # names first; only the model chosen is opened
    chosen = None if "/" in spec else choose(spec, entries)
    if chosen:
        m = _open(*chosen)
        if m.model is None:
            raise ModelFileError(f"{shown(m.name)}: {shown(m.error, 400)}")
        return m.path
    if spec.endswith(".gguf"):
        return path
    if repo:
        quant = repo.group("quant") or DEFAULT_QUANT
        for name in pulled_names(repo.group("repo"), quant):
            if m := find(name, entries):
                return m.path
        raise NotInStore(repo.group("repo"), quant)
    hint = f" (in the store: {candidates(entries)})" if entries else " (the store is empty: localmix pull REPO)"
    raise LocalmixError(f"no model '{shown(spec)}': not a file and not in the store{hint}")
