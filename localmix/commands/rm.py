"""`localmix rm MODEL [--yes]`: remove a model from the store (asks first), every part of a split one.
A broken or incomplete model can be removed too."""

from __future__ import annotations

import argparse
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="a model name in the store (localmix list)")
    p.add_argument("--yes", "-y", action="store_true", help="do not ask")


def run(args: argparse.Namespace) -> int:
    from ..errors import LocalmixError
    from ..models import stored_models

    matches = [m for m in stored_models() if m.name.lower() == args.model.lower()]
    if not matches:
        raise LocalmixError(f"no model {args.model!r} in the store (see localmix list)")
    m = matches[0]
    if not args.yes:
        if not sys.stdin.isatty():
            raise LocalmixError(f"remove {m.name}? pass --yes to confirm when not in a terminal")
        answer = input(f"Remove {m.name} ({m.size / 2**30:.1f} GiB, {len(m.files)} file(s))? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            print("Kept.")
            return 1
    for f in m.files:
        f.unlink()  # a link into the Hugging Face cache removes the link, not the cached file
    print(f"Removed {m.name}")
    return 0
