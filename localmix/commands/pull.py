"""`localmix pull REPO [QUANT|FILE]`: a model from the Hugging Face hub into the store (localmix.hub)."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("repo", metavar="REPO", help="hub repo id, e.g. bartowski/Mixtral-8x7B-Instruct-v0.1-GGUF")
    p.add_argument("quant", metavar="QUANT|FILE", nargs="?", default="Q4_K_M",
                   help="the quant to fetch (default Q4_K_M), or a file name in the repo")
    p.add_argument("--revision", help="branch, tag or commit")
    p.add_argument("--force", action="store_true", help="fetch and link again even if the model is in the store")


def run(args: argparse.Namespace) -> int:
    from ..hub import pull
    from ..modelfile import model_name
    from ..text import shown

    # The note on cleaned-up partial files goes to stdout: stderr stays one line when the pull fails.
    path = pull(args.repo, args.quant, args.revision, args.force, say=print)
    print(f"{shown(model_name(path))} is in the store: {shown(path, 1000)}")
    return 0
