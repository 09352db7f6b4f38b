"""The built-in texts: calibration text for `--imatrix auto` and evaluation text for `localmix eval`.

Each is the package's files data/text/{calibration,eval}/<part>.txt (the seed's five languages, code,
maths) cut at blank lines into blocks of about BLOCK characters and interleaved round-robin, so that any
prefix (--calibration-tokens, --chunks) covers every part, as a whole-text sample would. The two sets
are distinct texts; their sources and licences are in data/text/README.md.
"""

from __future__ import annotations

from importlib import resources

from .errors import QuantizeError

PARTS = ("en", "fr", "de", "it", "es", "code", "maths")
SEPARATOR = "\n\n"
BLOCK = 1500  # characters: about one 512-token chunk of prose, so consecutive chunks change part


def blocks(text: str, size: int = BLOCK) -> list[str]:
    """`text` in pieces of at least `size` characters (the last may be shorter), cut only at blank lines."""
    out, cur, n = [], [], 0
    for para in text.strip("\n").split(SEPARATOR):
        cur.append(para)
        n += len(para) + len(SEPARATOR)
        if n >= size:
            out.append(SEPARATOR.join(cur))
            cur, n = [], 0
    if cur:
        out.append(SEPARATOR.join(cur))
    return out


def interleave(texts: list[str], size: int = BLOCK) -> str:
    parts = [blocks(t, size) for t in texts]
    rounds = max((len(b) for b in parts), default=0)
    return SEPARATOR.join(b[i] for i in range(rounds) for b in parts if i < len(b))


def _joined(kind: str) -> str:
    folder = resources.files("quantize").joinpath("data", "text", kind)
    try:
        texts = [folder.joinpath(f"{part}.txt").read_text(encoding="utf-8") for part in PARTS]
    except OSError as e:  # shipped with the package: a broken installation
        raise QuantizeError(f"a built-in {kind} text is missing from this installation of localmix: {e.strerror or e}") from None
    return interleave(texts)


def calibration_text() -> str:
    return _joined("calibration")


def eval_text() -> str:
    return _joined("eval")
