"""Models from the Hugging Face hub into the store (`localmix pull`).

From a GGUF repo: the file for the quant asked (Q4_K_M by default), or the file named, with every part
of a split GGUF. A part already in the Hugging Face cache is linked from there (no second copy);
otherwise it is downloaded into the store with huggingface-hub's HTTP client (its token, endpoint and
progress bars), into a partial file that the next pull resumes (huggingface-hub's own cache throws an
interrupted download away, which costs hours on an 85 GB model). A pull holds a lock on its model's
name, so two pulls never write one partial file, and removes partial files that no running pull holds
and nobody will resume (see PARTIAL_DIR). Each part is checked against the
hub's size and sha256, and only when all are there do they take their names in the store, part 1
last, so an interrupted pull never looks complete. HF_HUB_OFFLINE uses the cache alone. From a
safetensors repo: `quantize`.

Nothing here asks the user anything; commands do."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from quantize.errors import Error

from .errors import LocalmixError, ModelFileError
from .modelfile import model_name, open_model_file, parse_split_name, split_name
from .models import DEFAULT_QUANT, pulled_names
from .paths import ensure_dir, models_dir
from .text import shown
from .units import fmt_bytes

try:
    import fcntl
except ImportError:  # Windows: no locks; only partials left for STALE_AFTER (or of a removed model) are removed
    fcntl = None

QUANT_IN_NAME = re.compile(r"[-_.](I?Q\d[\w]*|F16|BF16|F32)(?=[-_.])", re.I)


def choose_files(files: list[str], quant: str) -> list[str]:
    """The GGUF file(s) of a repo for a quant or a file name: every part of a split model."""
    ggufs = sorted(f for f in files if f.endswith(".gguf"))
    if quant in ggufs:
        chosen = quant
    else:
        pattern = re.compile(rf"(^|[-_.]){re.escape(quant)}([-_.]|$)", re.I)
        matches = sorted({_whole(f) for f in ggufs if pattern.search(f.rsplit("/", 1)[-1])})
        if not matches:
            quants = sorted({m.group(1) for f in ggufs if (m := QUANT_IN_NAME.search(f))})
            raise LocalmixError(f"no {quant} file in this repo (it has: {', '.join(quants) or ', '.join(ggufs) or 'no GGUF files'})")
        if len(matches) > 1:
            raise LocalmixError(f"{quant} matches several files ({', '.join(matches)}); name the file")
        chosen = matches[0]
    split = parse_split_name(chosen.rsplit("/", 1)[-1])
    if split:  # a part was named: the whole model
        chosen = _whole(chosen)
    folder = chosen.rsplit("/", 1)[0] + "/" if "/" in chosen else ""
    stem = chosen.rsplit("/", 1)[-1].removesuffix(".gguf")
    parts = sorted(f for f in ggufs if f.startswith(folder) and (p := parse_split_name(f[len(folder):])) and p[0] == stem)
    if not parts:
        return [chosen]
    count = parse_split_name(parts[0][len(folder):])[2]
    if len(parts) != count:
        raise LocalmixError(f"{chosen}: the repo has {len(parts)} of its {count} parts")
    return parts


def _whole(path: str) -> str:
    """A split part's path as the whole model's ('x-00001-of-00002.gguf' -> 'x.gguf')."""
    folder, _, name = path.rpartition("/")
    split = parse_split_name(name)
    name = f"{split[0]}.gguf" if split else name
    return f"{folder}/{name}" if folder else name


def _listing(repo: str, revision: str | None) -> tuple[list[str] | None, dict, dict, str | None]:
    """(files, sizes, sha256s, commit) from the hub; files None when offline (only the cache can be used)."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import LocalEntryNotFoundError

    from quantize.hub import hub_error

    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return None, {}, {}, None
    try:
        info = HfApi().model_info(repo, revision=revision, files_metadata=True)
    except LocalEntryNotFoundError:
        return None, {}, {}, None
    except Exception as e:  # noqa: BLE001 - mapped to one line, or re-raised as it is
        raise hub_error(e, repo, revision, "listing the repo") from None
    siblings = info.siblings or []
    return ([s.rfilename for s in siblings], {s.rfilename: s.size for s in siblings},
            {s.rfilename: s.lfs.sha256 for s in siblings if s.lfs}, info.sha)


def _cached_files(repo: str, revision: str | None) -> list[str]:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        folder = Path(snapshot_download(repo, revision=revision, local_files_only=True))
    except (LocalEntryNotFoundError, OSError):
        raise LocalmixError(f"{repo}: offline (HF_HUB_OFFLINE) and not in the Hugging Face cache") from None
    cached = [str(p.relative_to(folder)) for p in folder.rglob("*.gguf")]
    if not cached:
        raise LocalmixError(f"{repo}: offline (HF_HUB_OFFLINE) and no GGUF of it in the Hugging Face cache")
    return cached


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _in_cache(repo: str, part: str, revision: str | None) -> Path | None:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(repo, part, revision=revision, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):
        return None


def _download(repo: str, part: str, revision: str | None, size: int | None, partial: Path) -> None:
    """`part` into `partial`, resuming from what is there already."""
    from huggingface_hub import hf_hub_url
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import build_hf_headers

    from quantize.hub import hub_error

    partial.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(partial, "ab") as f:
            http_get(hf_hub_url(repo, part, revision=revision), f, resume_size=f.tell(), headers=build_hf_headers(),
                     expected_size=size, displayed_filename=part.rsplit("/", 1)[-1])
    except Exception as e:  # noqa: BLE001 - mapped to one line, or re-raised as it is
        raise hub_error(e, repo, revision, f"download of {part}") from None


def _check(local: Path, part: str, size: int | None, digest: str | None) -> None:
    if size is not None and local.stat().st_size != size:
        raise LocalmixError(f"{part}: {local.stat().st_size} bytes downloaded, the hub says {size}")
    if digest and sha256(local) != digest:
        raise LocalmixError(f"{part}: sha256 does not match the hub's; the file is corrupt ({local}: delete it and pull again)")


def _fetch(repo: str, part: str, revision: str | None, size: int | None, digest: str | None, target: Path) -> tuple[Path, bool]:
    """(file, cached): the part in the Hugging Face cache (cached, to link), or downloaded beside the store
    (to move into place), checked either way."""
    local = _in_cache(repo, part, revision)
    if local is not None:
        _check(local, part, size, digest)
        return local, True
    if size is None and digest is None:  # no listing: offline, and the cache does not have it
        raise LocalmixError(f"{repo}: offline (HF_HUB_OFFLINE) and {part} is not in the Hugging Face cache")
    partial = target.parent / PARTIAL_DIR / partial_name(target, size, digest)
    _download(repo, part, revision, size, partial)
    try:
        _check(partial, part, size, digest)
    except LocalmixError:
        partial.unlink(missing_ok=True)  # a corrupt download is not resumed
        raise
    return partial, False


def _link(source: Path, target: Path) -> None:
    """target -> source, replacing target at once: a symlink, else a hard link, else a copy."""
    tmp = target.with_name(f".{target.name}.{os.getpid()}.link")
    tmp.unlink(missing_ok=True)
    try:
        tmp.symlink_to(source.resolve())
    except OSError:  # no symlinks (some Windows setups)
        try:
            os.link(source.resolve(), tmp)
        except OSError:
            shutil.copyfile(source, tmp)
    os.replace(tmp, target)


# Partial downloads: `.partial/TARGET.DIGEST.partial`, resumed by the next pull of the same file. A pull
# holds `.partial/NAME.lock` (an flock, with its PID inside for messages) for as long as it runs, so a
# second pull of NAME is refused instead of writing into the same file, and cleaning skips NAME's files.
# A partial file is removed once its model is complete in the store (what the pull did not resume was
# superseded: the hub's file changed), when its model is removed (`rm`), or, when nobody is pulling its
# model, once nobody resumed it for STALE_AFTER.
PARTIAL_DIR = ".partial"
STALE_AFTER = 7 * 86400
LINK_TMP = re.compile(r"^\..+\.(\d+)\.link$")  # `_link`'s temporary name, with the PID of its pull


def partial_name(target: Path, size: int | None, digest: str | None) -> str:
    return f"{target.name}.{(digest or str(size))[:16]}.partial"


def _owner(name: str) -> str | None:
    """The store name of the model a partial download is for (None for anything else in the folder)."""
    if not name.endswith(".partial"):
        return None
    target = name.removesuffix(".partial").rpartition(".")[0]
    return model_name(Path(target)) if target.endswith(".gguf") else None


def _lock(path: Path) -> int | None:
    """An exclusive lock on `path` (made if missing): its descriptor, or None while another process holds it."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # its holder removed it as we opened it: lock the one there now


def _unlock(fd: int, path: Path) -> None:
    path.unlink(missing_ok=True)  # while still held: whoever comes next makes and locks a new one
    os.close(fd)


def _holder(path: Path) -> str:
    try:
        return f" (pid {int(path.read_text().strip() or 0)})"
    except (OSError, ValueError):
        return ""


@contextmanager
def pulling(store: Path, name: str):
    """Held while `name` is pulled; LocalmixError when another pull of it is running."""
    folder = ensure_dir(store / PARTIAL_DIR, "the folder of partial downloads")
    path = folder / f"{name}.lock"
    fd = _lock(path)
    if fd is None:
        raise LocalmixError(f"another localmix pull{_holder(path)} is fetching {shown(name)}; wait for it to finish, or stop it")
    try:
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        yield
    finally:
        _unlock(fd, path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # none, or not a PID this system can have
        return False
    except OSError:  # someone else's process
        return True
    return True


def clean_partials(store: Path, holding: str | None = None, drop: str | None = None,
                   now: float | None = None) -> list[tuple[Path, int]]:
    """Remove partial downloads no running pull holds: of `drop` all; of any other model those left for
    STALE_AFTER. `holding`: the model whose lock the caller holds (its files go only if it is `drop`).
    Also links half made by pulls that no longer run. Returns (path, bytes) of what was removed."""
    folder = store / PARTIAL_DIR
    now = time.time() if now is None else now
    owners: dict[str, list[Path]] = {}
    try:
        names = os.listdir(folder) if folder.is_dir() else []
    except OSError:
        names = []
    for n in names:
        if (owner := _owner(n)) is not None and (folder / n).is_file() and not (folder / n).is_symlink():
            owners.setdefault(owner, []).append(folder / n)
    for n in names:  # locks of pulls that were killed, with nothing downloaded yet
        if n.endswith(".lock") and (owner := n.removesuffix(".lock")) not in owners and owner != holding:
            owners[owner] = []
    removed = []
    for owner, files in owners.items():
        if owner == holding:
            removed += _remove(files if owner == drop else [])
            continue
        lock_path = folder / f"{owner}.lock"
        try:
            fd = _lock(lock_path)
        except OSError:  # a folder we may not write: nothing is removed from it either
            continue
        if fd is None:  # being pulled now
            continue
        try:
            removed += _remove([p for p in files if owner == drop or now - _mtime(p, now) > STALE_AFTER])
        finally:
            _unlock(fd, lock_path)
    try:
        links = [n for n in os.listdir(store) if (m := LINK_TMP.match(n)) and not _alive(int(m.group(1)))]
    except OSError:
        links = []
    return removed + _remove([store / n for n in links])


def _mtime(path: Path, default: float) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return default


def _remove(paths: list[Path]) -> list[tuple[Path, int]]:
    out = []
    for p in paths:
        try:
            size = p.lstat().st_size if not p.is_symlink() else 0
            p.unlink()
            out.append((p, size))
        except OSError:  # gone already, or not ours to remove: left as it is
            pass
    return out


def cleaned(removed: list[tuple[Path, int]], why: str) -> str | None:
    """One line about removed partial files, for a command to print (None when nothing was removed)."""
    if not removed:
        return None
    total = sum(size for _, size in removed)
    return f"removed {len(removed)} partial download file(s) {why} ({total / 2**20:,.1f} MiB)"


def _complete(targets: list[Path]) -> bool:
    """The store already has exactly these files as one checked model."""
    try:
        return open_model_file(targets[0]).parts == tuple(targets)
    except (Error, OSError):
        return False


def pull(repo: str, quant: str = DEFAULT_QUANT, revision: str | None = None, force: bool = False,
         say: Callable[[str], None] = lambda line: None) -> Path:
    """Fetch, check and link; returns the store path of the model (part 1 of a split one). `say` gets one
    line about partial downloads of earlier pulls that were removed."""
    files, sizes, hashes, commit = _listing(repo, revision)
    if files is not None and not any(f.endswith(".gguf") for f in files) and any(f.endswith(".safetensors") for f in files):
        return _quantize(repo, quant, revision, force, say)
    parts = choose_files(files if files is not None else _cached_files(repo, revision), quant)

    label = pulled_names(repo, quant)[0]
    store = models_dir()
    targets = [store / (f"{label}.gguf" if len(parts) == 1 else split_name(label, i + 1, len(parts))) for i in range(len(parts))]
    try:
        with pulling(store, label):
            removed = clean_partials(store, holding=label)  # not this model's: the next lines may resume them
            try:
                if not force and _complete(targets):
                    path = targets[0]
                else:
                    for t in targets:
                        if t.is_dir() and not t.is_symlink():
                            raise LocalmixError(f"{shown(t)} is a folder; move it out of the store to pull {shown(label)}")
                    path = _pull_parts(repo, parts, commit or revision, sizes, hashes, targets)
                removed += clean_partials(store, holding=label, drop=label)  # complete: its leftovers are of no use
                return path
            finally:
                if line := cleaned(removed, "left by pulls that no longer run"):
                    say(line)
    except OSError as e:  # the store's folders as something else than folders, a full disk, no permission
        where = f"{shown(e.filename)}: " if e.filename else ""
        raise LocalmixError(f"pull of {repo} failed: {where}{e.strerror or e}") from None


def _pull_parts(repo: str, parts: list[str], revision: str | None, sizes: dict, hashes: dict, targets: list[Path]) -> Path:
    fetched = [_fetch(repo, part, revision, sizes.get(part), hashes.get(part), target) for part, target in zip(parts, targets)]
    for (source, cached), target in reversed(list(zip(fetched, targets))):  # part 1 last: complete when it appears
        if cached:
            _link(source, target)
        else:
            os.replace(source, target)
    try:
        return open_model_file(targets[0]).path
    except ModelFileError:
        for t in targets:
            t.unlink(missing_ok=True)
        raise


def _quantize(repo: str, quant: str, revision: str | None, force: bool, say: Callable[[str], None]) -> Path:
    from quantize.convert import convert, default_name
    from quantize.hub import resolve

    folder, source = resolve(repo, revision)
    out = models_dir() / default_name(repo, quant.upper())
    if out.exists() and not force:
        return out
    def on_stale(r) -> None:
        say(f"removed a partial file left by an interrupted quantize (pid {r.pid}, {fmt_bytes(r.size)}): {shown(r.path, 400)}")

    convert(folder, out, quant.upper(), force=force, source=source, on_stale=on_stale)
    return out
