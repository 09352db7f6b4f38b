"""`localmix pull REPO [QUANT|FILE]`: a model from the Hugging Face hub into the store.

From a GGUF repo: the file for the quant asked (Q4_K_M by default), all parts of a split GGUF, downloaded
by huggingface-hub (its progress bars, resume, cache, token and HF_HUB_OFFLINE), checked against the
hub's size and sha256, and linked into the store, so that the cache holds the only copy. From a
safetensors repo: `quantize`."""

from __future__ import annotations

import argparse
import re

from .common import parse_size

SPLIT = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("repo", metavar="REPO", help="hub repo id, e.g. bartowski/Mixtral-8x7B-Instruct-v0.1-GGUF")
    p.add_argument("quant", metavar="QUANT|FILE", nargs="?", default="Q4_K_M",
                   help="the quant to fetch (default Q4_K_M), or a file name in the repo")
    p.add_argument("--revision", help="branch, tag or commit")
    p.add_argument("--vram", type=parse_size, metavar="SIZE", help=argparse.SUPPRESS)
    p.add_argument("--ram", type=parse_size, metavar="SIZE", help=argparse.SUPPRESS)
    p.add_argument("--force", action="store_true", help="replace the model in the store if it is there")


def choose_files(files: list[str], quant: str) -> list[str]:
    """The GGUF file(s) for a quant or a file name: every part of a split model."""
    from ..errors import UserError

    ggufs = sorted(f for f in files if f.endswith(".gguf"))
    if quant in ggufs:
        chosen = quant
    else:
        pattern = re.compile(rf"(^|[-_.]){re.escape(quant)}([-_.]|$)", re.I)
        matches = sorted({SPLIT.sub(".gguf", f) for f in ggufs if pattern.search(f.rsplit("/", 1)[-1])})
        if not matches:
            quants = sorted({m.group(0).strip("-_.") for f in ggufs
                             if (m := re.search(r"[-_.](I?Q\d[\w]*|F16|BF16|F32)(?=[-_.])", f, re.I))})
            raise UserError(f"no {quant} file in this repo (it has: {', '.join(quants) or ', '.join(ggufs) or 'no GGUF files'})")
        if len(matches) > 1:
            raise UserError(f"{quant} matches several files ({', '.join(matches)}); name the file")
        chosen = matches[0]
    stem = chosen.removesuffix(".gguf")
    parts = sorted(f for f in ggufs if f == chosen or re.fullmatch(re.escape(stem) + r"-\d{5}-of-\d{5}\.gguf", f))
    if parts and SPLIT.search(parts[0]):
        count = int(SPLIT.search(parts[0]).group(2))
        if len(parts) != count:
            raise UserError(f"{chosen}: the repo has {len(parts)} of its {count} parts")
    return parts or [chosen]


def pull(repo: str, quant: str = "Q4_K_M", revision: str | None = None, force: bool = False):
    """Fetch and link; returns the store path of the model (its first file)."""
    import hashlib
    import os
    from pathlib import Path

    from huggingface_hub import HfApi, hf_hub_download, snapshot_download

    from ..errors import UserError
    from ..paths import models_dir

    from huggingface_hub.errors import LocalEntryNotFoundError as NotCached

    from quantize.hub import hub_error

    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    sizes, hashes = {}, {}
    try:
        if offline:
            raise NotCached("offline")
        info = HfApi().model_info(repo, revision=revision, files_metadata=True)
        files = [s.rfilename for s in info.siblings or []]
        for s in info.siblings or []:
            sizes[s.rfilename] = s.size
            if s.lfs:
                hashes[s.rfilename] = s.lfs.sha256
    except NotCached:
        files = None  # offline: only what the cache already has
    except Exception as e:
        raise hub_error(e, repo, revision, "listing the repo") from None

    if files is None:  # offline: choose among the repo's files in the cache
        try:
            folder = Path(snapshot_download(repo, revision=revision, local_files_only=True))
        except (NotCached, OSError):
            raise UserError(f"{repo}: offline (HF_HUB_OFFLINE) and not in the Hugging Face cache") from None
        cached = [str(p.relative_to(folder)) for p in folder.rglob("*.gguf")]
        if not cached:
            raise UserError(f"{repo}: offline (HF_HUB_OFFLINE) and no GGUF of it in the Hugging Face cache")
        parts = choose_files(cached, quant)
    elif not any(f.endswith(".gguf") for f in files) and any(f.endswith(".safetensors") for f in files):
        return _quantize(repo, quant, revision, force)
    else:
        parts = choose_files(files, quant)

    name = re.sub(r"(?i)-gguf$", "", repo.split("/")[-1])
    label = quant.removesuffix(".gguf") if quant.endswith(".gguf") else f"{name}-{quant.upper()}"
    store = models_dir()
    targets = [store / (f"{label}.gguf" if len(parts) == 1 else f"{label}-{i + 1:05d}-of-{len(parts):05d}.gguf")
               for i in range(len(parts))]
    if targets[0].exists() and not force:
        return targets[0]
    for part, target in zip(parts, targets):
        try:
            local = Path(hf_hub_download(repo, part, revision=revision))
        except Exception as e:
            raise hub_error(e, repo, revision, f"download of {part}") from None
        if part in sizes and sizes[part] is not None and local.stat().st_size != sizes[part]:
            raise UserError(f"{part}: {local.stat().st_size} bytes downloaded, the hub says {sizes[part]}")
        if part in hashes:
            h = hashlib.sha256()
            with open(local, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 22), b""):
                    h.update(chunk)
            if h.hexdigest() != hashes[part]:
                raise UserError(f"{part}: sha256 does not match the hub's; the cached file is corrupt (delete it and pull again)")
        tmp = target.with_name(f".{target.name}.link")
        tmp.unlink(missing_ok=True)
        try:
            tmp.symlink_to(local.resolve())
        except OSError:  # no symlinks (some Windows setups): a hard link, else a copy
            try:
                os.link(local.resolve(), tmp)
            except OSError:
                import shutil

                shutil.copyfile(local, tmp)
        os.replace(tmp, target)
    return targets[0]


def _quantize(repo: str, quant: str, revision: str | None, force: bool):
    from quantize.convert import convert, default_name
    from quantize.hub import resolve

    from ..paths import models_dir

    folder, source = resolve(repo, revision)
    out = models_dir() / default_name(repo, quant.upper())
    if out.exists() and not force:
        return out
    convert(folder, out, quant.upper(), force=force, source=source)
    return out


def run(args: argparse.Namespace) -> int:
    path = pull(args.repo, args.quant, args.revision, args.force)
    print(f"{path.name.removesuffix('.gguf')} is in the store: {path}")
    return 0
