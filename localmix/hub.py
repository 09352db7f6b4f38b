"""Models from the Hugging Face hub into the store (`localmix pull`).

From a GGUF repo: the file for the quant asked (Q4_K_M by default), or the file named, with every part
of a split GGUF. A part already in the Hugging Face cache is linked from there (no second copy);
otherwise it is downloaded into the store with huggingface-hub's HTTP client (its token, endpoint and
progress bars), into a partial file that the next pull resumes (huggingface-hub's own cache throws an
interrupted download away, which costs hours on an 85 GB model). Each part is checked against the
hub's size and sha256, and only when all are there do they take their names in the store, part 1
last, so an interrupted pull never looks complete. HF_HUB_OFFLINE uses the cache alone. From a
safetensors repo: `quantize`.

Nothing here asks the user anything; commands do."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from pathlib import Path

from .errors import LocalmixError, ModelFileError
from .modelfile import open_model_file, parse_split_name, split_name
from .models import DEFAULT_QUANT, find, pulled_names
from .paths import models_dir

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
    partial = target.parent / ".partial" / f"{target.name}.{(digest or str(size))[:16]}.partial"
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


def pull(repo: str, quant: str = DEFAULT_QUANT, revision: str | None = None, force: bool = False) -> Path:
    """Fetch, check and link; returns the store path of the model (part 1 of a split one)."""
    files, sizes, hashes, commit = _listing(repo, revision)
    if files is not None and not any(f.endswith(".gguf") for f in files) and any(f.endswith(".safetensors") for f in files):
        return _quantize(repo, quant, revision, force)
    parts = choose_files(files if files is not None else _cached_files(repo, revision), quant)

    label = pulled_names(repo, quant)[0]
    store = models_dir()
    targets = [store / (f"{label}.gguf" if len(parts) == 1 else split_name(label, i + 1, len(parts))) for i in range(len(parts))]
    present = find(label)
    if present is not None and not force and present.model.parts == tuple(targets):
        return present.path
    fetched = [_fetch(repo, part, commit or revision, sizes.get(part), hashes.get(part), target)
               for part, target in zip(parts, targets)]
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


def _quantize(repo: str, quant: str, revision: str | None, force: bool) -> Path:
    from quantize.convert import convert, default_name
    from quantize.hub import resolve

    folder, source = resolve(repo, revision)
    out = models_dir() / default_name(repo, quant.upper())
    if out.exists() and not force:
        return out
    convert(folder, out, quant.upper(), force=force, source=source)
    return out
