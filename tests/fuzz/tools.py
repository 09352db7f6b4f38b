"""Hostile tool inputs through `localmix run`: --tools files that exit, interrupt, raise or carry odd
hints and schemas at import; --json-schema files nested too deep; and calls of the calculator forced
on the small real model of tests/fuzz/gguf.py (its random weights write random expressions under the
call grammar), with seeds. Each case runs in its own folder.

    for case in cases(seed=1, n=40, workdir=tmp):
        ...
"""

from __future__ import annotations

import random
from pathlib import Path

from tests.fuzz.gguf import base_model, serialise
from tests.fuzz.harness import Case

TOOL_FILES = {
    "exits 0": "import sys\nsys.exit(0)\n",
    "exits 3": "import sys\nsys.exit(3)\n",
    "exits with text": "raise SystemExit('bye')\n",
    "interrupts": "raise KeyboardInterrupt\n",
    "base exception": "raise BaseException('odd')\n",
    "raises": "def f(x: int) -> int:\n    return x\n1 / 0\n",
    "syntax error": "def f(:\n",
    "nul byte": "x = 1\x00\n",
    "no functions": "X = 1\n",
    "type checking hints": "from __future__ import annotations\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                           "    from pathlib import Path\n\ndef size(name: str) -> Path:\n    '''Size.'''\n    return name\n\n"
                           "def open_it(p: Path) -> str:\n    '''Open.'''\n    return ''\n",
    "unknown hint": "def f(x: 'Nope') -> str:\n    '''F.'''\n    return ''\n",
    "type without schema": "def f(x: object) -> str:\n    '''F.'''\n    return ''\n",
    "default not JSON": "import pathlib\n\ndef f(p: str = pathlib.Path('.')) -> str:\n    '''F.'''\n    return str(p)\n",
    "schema nested deep": "from typing import Annotated\nS = {}\nfor _ in range(300):\n    S = {'type': 'array', 'items': S}\n\n"
                          "def f(x: Annotated[list, S]) -> str:\n    '''F.'''\n    return ''\n",
    "parser too deep": "def f(x: dict = " + "{'a': " * 300 + "1" + "}" * 300 + ") -> str:\n    '''F.'''\n    return ''\n",
    "same name as a built-in": "def calculator(expression: str) -> str:\n    '''Mine.'''\n    return ''\n",
    "prints at import": "print('hello from the tools file')\n\ndef f(x: int) -> int:\n    '''F.'''\n    return x\n",
    "fine": "def shout(text: str) -> str:\n    '''Upper-case a text.'''\n    return text.upper()\n",
}


def _deep_schema(levels: int) -> str:
    return '{"type": "array", "items": ' * levels + "{}" + "}" * levels


SCHEMAS = {"schema 70 deep": _deep_schema(70), "schema 300 deep": _deep_schema(300),
           "schema 100,000 deep": _deep_schema(100_000), "schema not JSON": "{", "schema a list": "[1]"}
RUN = ["--vram", "0", "--ctx", "2048", "--threads", "1"]


def cases(seed: int, n: int, workdir: Path, *, timeout: float = 30.0) -> list[Case]:
    """Every tools file (with --print-prompt, and a real run for some), every schema file, then forced
    calculator calls with seeds from `seed` until there are `n` cases (at least the named ones)."""
    r = random.Random(seed)
    model = serialise(base_model())
    out = []

    def folder(name: str) -> Path:
        d = workdir / f"tools{seed}-{len(out):04d}"
        d.mkdir(parents=True, exist_ok=True)
        (d / "model.gguf").write_bytes(model)
        return d

    for i, (label, body) in enumerate(TOOL_FILES.items()):
        d = folder(label)
        (d / "mytools.py").write_text(body)
        out.append(Case(["run", "model.gguf", "hi", "--tools", "mytools.py", "--print-prompt"], str(d), timeout, f"tools file: {label}"))
        if i % 3 == 0:
            out.append(Case(["run", "model.gguf", "hi", "--tools", "mytools.py", "--max-tokens", "8", *RUN], str(d), timeout,
                            f"tools file: {label}"))
    for label, text in SCHEMAS.items():
        d = folder(label)
        (d / "schema.json").write_text(text)
        out.append(Case(["run", "model.gguf", "hi", "--json-schema", "schema.json", "--max-tokens", "4", *RUN], str(d), timeout, label))
    while len(out) < n:
        d = folder("calls")
        s = r.randrange(1 << 30)
        choice = r.choice(["calculator", "required", "auto"])
        out.append(Case(["run", "model.gguf", r.choice(["compute", "9^9^9", "(9^9999)^9999"]), "--tools", "--tool-choice", choice,
                         "--max-tokens", "120", "--seed", str(s), *RUN], str(d), timeout, f"calls: {choice} seed {s}"))
    return out


def main(argv: list[str] | None = None) -> int:
    """`python -m tests.fuzz.tools [--seed S] [--n N]`: a sweep, with totals per kind of outcome."""
    import argparse
    import collections
    import tempfile
    import time

    from tests.fuzz.harness import Harness, failures, isolated_env, leftovers

    p = argparse.ArgumentParser(prog="python -m tests.fuzz.tools")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--workers", type=int, default=None)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="fuzz-tools-") as tmp:
        home = Path(tmp) / "home"
        env = isolated_env(home)
        all_cases = cases(args.seed, args.n, Path(tmp) / "cases")
        t0 = time.monotonic()
        with Harness(env=env, workers=args.workers) as h:
            outcomes = h.run(all_cases)
        seconds = time.monotonic() - t0
    kinds = collections.Counter(o.kind for o in outcomes)
    print(f"{len(outcomes)} cases in {seconds:.0f} s: " + ", ".join(f"{k} {v}" for k, v in sorted(kinds.items())))
    print(f"files left: {len(leftovers(outcomes))}")
    bad = [o for o in outcomes if not o.ok]
    if bad:
        print(failures(bad))
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
