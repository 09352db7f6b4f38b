"""`localmix rm MODEL [--yes]`: remove a model from the store (asks first), every part of a split one,
and its partial downloads. MODEL is a store name (exactly, or the only one of any case) or a file name
in the store; it shows the files it removes. A broken or incomplete model can be removed too: a link
(even to a deleted file, or a loop) is removed, never what it points to; an empty folder named like a
model is removed, a folder with files in it is refused."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="a model name in the store (localmix list)")
    p.add_argument("--yes", "-y", action="store_true", help="do not ask")


def describe(path: Path) -> str:
    """A file to be removed, as shown: a link with what it points to (which stays)."""
    import os

    from ..text import shown

    if path.is_symlink():
        stays = ", which stays" if path.exists() else ""
        return f"{shown(path, 1000)} (a link to {shown(os.readlink(path), 1000)}{stays})"
    if path.is_dir():
        return f"{shown(path, 1000)} (an empty folder)"
    return shown(path, 1000)


def run(args: argparse.Namespace) -> int:
    from ..errors import LocalmixError
    from ..hub import clean_partials, cleaned
    from ..models import stored
    from ..paths import models_dir
    from ..text import shown

    m = stored(args.model)
    name = shown(m.name)
    for f in m.files:  # all refused before any is removed
        if f.is_dir() and not f.is_symlink() and any(f.iterdir()):
            raise LocalmixError(f"{shown(f, 1000)} is a folder with files in it, not a model file; not removing it")
    broken = f", broken: {shown(m.error, 300)}" if m.error else ""
    print(f"{name} ({m.size / 2**30:.1f} GiB, {len(m.files)} file(s){broken}):")
    for f in m.files:
        print(f"  {describe(f)}")
    if not args.yes:
        if not sys.stdin.isatty():
            raise LocalmixError(f"remove {name}? pass --yes to confirm when not in a terminal")
        answer = input(f"Remove {name}? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            print("Kept.")
            return 1
    for f in m.files:
        try:
            f.rmdir() if f.is_dir() and not f.is_symlink() else f.unlink()  # a link goes, not what it points to
        except FileNotFoundError:
            pass
        except OSError as e:
            raise LocalmixError(f"cannot remove {shown(f, 1000)}: {e.strerror or e}") from None
    print(f"Removed {name}")
    if line := cleaned(clean_partials(models_dir(), drop=m.name), f"of {name} and of pulls left for a week"):
        print(line)
    return 0
