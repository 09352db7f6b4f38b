"""Hostile model stores × the commands that name models: seeded, reusable cases for the fork-server harness.

Each case is its own folder used as LOCALMIX_HOME (the harness runs every case with `LOCALMIX_HOME=.` in
the case's folder, see ENV): a store with a few good models (hard links of one real GGUF) whose names
differ only by case or share prefixes, and hostile entries: a link whose Hugging Face blob was deleted,
link loops, folders and a pipe named `x.gguf`, empty, garbage, truncated and unreadable files, names with
markup, escape sequences, invalid UTF-8 or 230 characters, hidden files, partial downloads of pulls that
no longer run (stale, fresh, superseded), their locks and half-made links, `.partial` as a file, and a
Hugging Face cache to pull from offline. The command is one of `list`, `list --json`, `info NAME`,
`run NAME --print-prompt`, `rm NAME --yes` or `pull REPO`, NAME picked to hit each naming rule: exact,
another case, a file name, a prefix, several at once, nothing, hostile strings.

`check(outcome)` says what went wrong beyond the harness's own test (exit 0, or exit 1 with one line):
a file of another model removed or replaced ("wrong file touched"), a model opened that the name does
not pick, a name refused that picks one model, a partial file listed, a live partial removed, an escape
character printed, files left behind.

    with Harness(env=ENV) as h:
        outcomes = h.run(cases(seed, n, workdir))
    problems = [p for o in outcomes for p in check(o)]
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.fuzz.harness import Case, Outcome

ENV = {"LOCALMIX_HOME": ".", "HF_HOME": "./hf", "HF_HUB_OFFLINE": "1", "NO_COLOR": "1"}
SPLIT = re.compile(r"^(.+)-(\d{5})-of-(\d{5})\.gguf$")
REPO, REPO_NAME = "acme/x-GGUF", "x-Q4_K_M"
COMMIT = "0" * 40
STALE = 30 * 86400  # older than any sensible limit for an abandoned partial download
DEAD_PID = 4_194_304 + 7  # above Linux's largest pid_max: never a running process

# Names of good models: some differ only by case, some are prefixes of others.
GOOD_NAMES = ["Mixtral-Q4_K_M", "mixtral-q4_k_m", "MIXTRAL-Q4_K_M", "mixtral-Q4_K_S", "Mixtral-8x7B-Q4_K_M",
              "tiny", "tiny-2", "Tiny-3", "m", "x-Q4_K_M", "-rf", "a b"]
HOSTILE_NAMES = ["evil[red]x[INST]\x1b]0;pwned\x07", "new\nline", "bad\udcffutf8", "L" * 230, "[bold red]x[", "tab\tname"]


@dataclass
class Entry:
    name: str
    files: list[str]  # file names in models/
    kind: str  # "good" (a whole real GGUF), "broken" (never opens), "any" (depends on the header)


@dataclass
class StoreCase(Case):
    command: str = ""
    spec: str | None = None
    entries: list[Entry] = field(default_factory=list)
    before: dict[str, str] = field(default_factory=dict)  # models/ as it was: name -> what it is
    partials: dict[str, str] = field(default_factory=dict)  # .partial/ file -> "live", "keep" or "stale"


def _tiny_model(workdir: Path) -> Path:
    """The tiny Mixtral of tests.support.checkpoints at Q4_K_M, made once in `workdir`."""
    out = workdir / "tiny-mixtral-Q4_K_M.gguf"
    if not out.exists():
        from quantize.convert import convert
        from tests.support.checkpoints import make_tiny_mixtral

        convert(make_tiny_mixtral(workdir / "tiny-mixtral"), out, "Q4_K_M")
    return out


def _place(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        dst.write_bytes(src.read_bytes())


def describe(path: Path) -> str:
    """What is at `path`, to compare before and after (a link by its target, a file by size and inode)."""
    try:
        st = os.lstat(path)
    except OSError:
        return "missing"
    if stat.S_ISLNK(st.st_mode):
        return f"link:{os.readlink(path)}"
    if stat.S_ISDIR(st.st_mode):
        return f"dir:{sorted(os.listdir(path))}"
    return f"{stat.S_IFMT(st.st_mode)}:{st.st_size}:{st.st_ino}"


def snapshot(models: Path) -> dict[str, str]:
    try:
        return {n: describe(models / n) for n in os.listdir(models) if not n.startswith(".")}
    except OSError:
        return {}


def _hf_cache(home: Path, model: Path, rng: random.Random) -> Path:
    """An offline Hugging Face cache holding REPO with x-Q4_K_M.gguf (a real GGUF); returns its blob."""
    repo = home / "hf" / "hub" / f"models--{REPO.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    blob = repo / "blobs" / hashlib.sha256(str(rng.random()).encode()).hexdigest()
    blob.parent.mkdir()
    _place(model, blob)
    snap = repo / "snapshots" / COMMIT
    snap.mkdir(parents=True)
    (snap / f"{REPO_NAME}.gguf").symlink_to(os.path.relpath(blob, snap))
    if rng.random() < 0.2:  # a FILE where a subfolder of the repo would be
        (snap / "Q8").write_text("not a folder")
    return blob


def _hostile(models: Path, home: Path, model: Path, rng: random.Random, name: str) -> tuple[Entry, ...]:
    """One hostile entry named `name` (kind by what it is)."""
    kind = rng.choice(["dangling", "loop", "self_loop", "folder", "full_folder", "fifo", "empty", "garbage", "truncated",
                       "unreadable", "dir_link", "cache_link", "split_part2", "split_pair"])
    f = models / f"{name}.gguf"
    if kind == "dangling":  # linked from the Hugging Face cache, then the cache entry was deleted
        blob = home / "hf" / "gone" / name[:50].encode("utf-8", "surrogateescape").hex()[:40]
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(b"x")
        f.symlink_to(blob.resolve())
        blob.unlink()
    elif kind == "loop":
        other = models / f"{name}-loop.gguf"
        f.symlink_to(other.name)
        other.symlink_to(f.name)
        return Entry(name, [f.name], "broken"), Entry(f"{name}-loop", [other.name], "broken")
    elif kind == "self_loop":
        f.symlink_to(f.name)
    elif kind == "folder":
        f.mkdir()
    elif kind == "full_folder":
        f.mkdir()
        (f / "keep.txt").write_text("the user's")
    elif kind == "fifo":
        os.mkfifo(f)
    elif kind == "empty":
        f.touch()
    elif kind == "garbage":
        f.write_bytes(rng.randbytes(rng.randrange(1, 5000)))
    elif kind == "truncated":
        with open(model, "rb") as src:
            f.write_bytes(src.read(rng.randrange(8, 300_000)))
    elif kind == "unreadable":
        f.write_bytes(b"GGUF" + rng.randbytes(100))
        f.chmod(0)
    elif kind == "dir_link":
        (home / "somedir").mkdir(exist_ok=True)
        f.symlink_to(home / "somedir")
    elif kind == "cache_link":  # as pull links the Hugging Face cache: a good model
        blob = home / "hf" / "blobs" / f"{rng.random()}"
        blob.parent.mkdir(parents=True, exist_ok=True)
        _place(model, blob)
        f.symlink_to(blob)
        return (Entry(name, [f.name], "good"),)
    elif kind == "split_part2":  # part 1 never arrived
        p = models / f"{name}-00002-of-00002.gguf"
        _place(model, p)
        return (Entry(name, [p.name], "broken"),)
    elif kind == "split_pair":  # split names on single-file GGUFs: the header decides
        ps = [models / f"{name}-0000{i}-of-00002.gguf" for i in (1, 2)]
        for p in ps:
            _place(model, p)
        return (Entry(name, [p.name for p in ps], "any"),)
    return (Entry(name, [f.name], "broken"),)


def _partials(models: Path, rng: random.Random, entries: list[Entry]) -> dict[str, str]:
    """Leftovers of earlier pulls in .partial: what each should become ("keep" or "stale")."""
    folder = models / ".partial"
    out = {}
    if rng.random() < 0.1:
        folder.write_text("a file where a folder should be")
        return out
    folder.mkdir()
    owners = [REPO_NAME, "other-Q8_0", *[e.name for e in rng.sample(entries, min(2, len(entries)))]]
    for _ in range(rng.randrange(0, 5)):
        owner = rng.choice(owners)
        if "/" in owner or len(owner) > 200:
            continue
        p = folder / f"{owner}.gguf.{rng.getrandbits(64):016x}.partial"
        p.write_bytes(rng.randbytes(rng.randrange(0, 3000)))
        old = rng.random() < 0.5
        if old:
            t = time.time() - STALE
            os.utime(p, (t, t))
        out[p.name] = "stale" if old else "keep"
    if rng.random() < 0.3:
        (folder / f"{rng.choice(owners)}.lock").write_text(str(DEAD_PID))  # a pull killed before it downloaded
    if rng.random() < 0.3:
        (models / f".{REPO_NAME}.gguf.{DEAD_PID}.link").symlink_to("nowhere")  # a link half made by a killed pull
    return out


def _variants(entries: list[Entry], rng: random.Random) -> list[str]:
    """Names to try: exact, another case, file names, prefixes, nothing, hostile strings."""
    names = [e.name for e in entries] or ["nothing"]
    pick = rng.choice(names)
    return [
        pick, pick, pick.swapcase(), pick.lower(), pick.upper(), rng.choice([f for e in entries for f in e.files] or ["x.gguf"]),
        pick[: rng.randrange(1, max(2, len(pick)))], "mixtral-Q4_K_M", "Mixtral", "mix", "tiny", "nosuch",
        "", "x" * 5000, "\x1b[2J\x1b]0;t\x07", "[/INST]", "../models/tiny.gguf", "models", REPO, f"{REPO}:Q8_0",
        "a/b/c", "C:\\x.gguf", ".hidden",
    ]


def _layout(home: Path, model: Path, rng: random.Random) -> tuple[list[Entry], dict[str, str]]:
    models = home / "models"
    if rng.random() < 0.03:  # the store folder is a file
        models.write_text("not a folder")
        return [], {}
    models.mkdir()
    entries = []
    for name in rng.sample(GOOD_NAMES, rng.randrange(0, 5)):
        _place(model, models / f"{name}.gguf")
        entries.append(Entry(name, [f"{name}.gguf"], "good"))
    pool = [n for n in GOOD_NAMES + HOSTILE_NAMES + ["broken", "Broken", "mixtral-q4_k_m-old"] if n not in {e.name for e in entries}]
    for name in rng.sample(pool, rng.randrange(0, 4)):
        if any(e.name == name for e in entries) or any(f"{name}.gguf" in e.files for e in entries):
            continue
        entries += _hostile(models, home, model, rng, name)
    (models / ".hidden.gguf").write_bytes(b"hidden")  # never a model
    partials = _partials(models, rng, entries)
    return entries, partials


def cases(seed: int, n: int, workdir: Path, model: Path | None = None) -> list[StoreCase]:
    """`n` cases, each in its own folder under `workdir`; `model` is a real GGUF to link (default: the tiny
    Mixtral, converted once into `workdir`)."""
    workdir.mkdir(parents=True, exist_ok=True)
    model = model or _tiny_model(workdir)
    out = []
    for i in range(n):
        rng = random.Random(seed * 1_000_003 + i)
        home = workdir / f"store-{seed}-{i}"
        home.mkdir()
        entries, partials = _layout(home, model, rng)
        if (home / "models").is_dir():
            _hf_cache(home, model, rng)
        spec = rng.choice(_variants(entries, rng))
        command = rng.choice(["list", "list-json", "info", "info", "run", "rm", "rm", "rm", "pull"])
        argv = {
            "list": ["list"], "list-json": ["list", "--json"], "info": ["info", "--json", "--", spec],
            "run": ["run", "--print-prompt", "--", spec, "hi"], "rm": ["rm", "--yes", "--", spec],
            "pull": ["pull", REPO, "Q4_K_M"],
        }[command]
        label = f"seed {seed} case {i}: {command} {spec!r:.60} in {[(e.name[:30], e.kind) for e in entries]}"
        out.append(StoreCase(argv=argv, cwd=str(home), timeout=60, label=label, command=command,
                             spec=spec if command in ("info", "run", "rm") else None, entries=entries,
                             before=snapshot(home / "models"), partials=partials))
    return out


# The naming rules, written again from the issue (not imported), most exact first.
RULES = (
    lambda spec, e: e.name == spec,
    lambda spec, e: spec in e.files,
    lambda spec, e: e.name.lower() == spec.lower(),
    lambda spec, e: spec != "" and e.name.lower().startswith(spec.lower()),
)


def picks(spec: str, entries: list[Entry], prefixes: bool) -> Entry | str:
    """The entry a name picks, "none", "several", or "path" where the name is not a store name at all."""
    if spec.startswith((".", "/", "~")) or "/" in spec or ":" in spec or "\\" in spec:
        return "path"
    for rule in RULES if prefixes else RULES[:-1]:
        found = [e for e in entries if rule(spec, e)]
        if len(found) > 1:
            return "several"
        if found:
            return found[0]
    return "path" if spec.endswith(".gguf") else "none"


def check(o: Outcome) -> list[str]:
    """What went wrong in one case, beyond `o.ok` (which is checked too)."""
    c: StoreCase = o.case
    home = Path(c.cwd)
    models = home / "models"
    problems = [] if o.ok else [f"not ok: {o.describe()}"]
    if any(ch in o.stdout + o.stderr for ch in "\x1b\x07"):
        problems.append("an escape character reached the terminal")
    after = snapshot(models)
    changed = sorted(n for n in set(c.before) | set(after) if c.before.get(n) != after.get(n))
    allowed: set[str] = set()
    if c.command == "rm" and o.code == 0:
        chosen = picks(c.spec, c.entries, prefixes=False)
        if not isinstance(chosen, Entry):
            problems.append(f"rm removed something for a name that picks {chosen}")
        else:
            allowed = set(chosen.files)
            if set(changed) != allowed or any(n in after for n in allowed):
                problems.append(f"rm of {chosen.name!r} removed {changed}, not {sorted(allowed)}")
    if c.command == "rm" and o.code != 0 and models.is_dir():
        chosen = picks(c.spec, c.entries, prefixes=False)
        if isinstance(chosen, Entry) and "folder with files" not in o.stderr:
            problems.append(f"rm refused {c.spec!r}, which picks {chosen.name!r}: {o.stderr.strip()[:200]}")
    if c.command == "pull":
        allowed = {f"{REPO_NAME}.gguf"}
        if o.code == 0 and not (models / f"{REPO_NAME}.gguf").is_file():
            problems.append("pull succeeded without a model in the store")
    if wrong := [n for n in changed if n not in allowed]:
        problems.append(f"wrong files touched: {wrong}")
    if c.command in ("info", "run"):
        chosen = picks(c.spec, c.entries, prefixes=True)
        if chosen in ("none", "several") and o.code == 0:
            problems.append(f"{c.command} of {c.spec!r} succeeded, but the name picks {chosen}")
        if isinstance(chosen, Entry):
            if chosen.kind == "good" and o.code != 0:
                problems.append(f"{c.command} of a good model {chosen.name!r} failed: {o.stderr.strip()[:200]}")
            if chosen.kind == "broken" and o.code == 0:
                problems.append(f"{c.command} of a broken entry {chosen.name!r} succeeded")
            if c.command == "info" and o.code == 0:
                opened = Path(json.loads(o.stdout)["path"]).name
                if opened not in chosen.files:
                    problems.append(f"info {c.spec!r} opened {opened}, not one of {chosen.files}")
    if c.command == "list-json" and o.code == 0:
        rows = json.loads(o.stdout)
        listed = sorted(r["name"] for r in rows)
        if listed != sorted(e.name for e in c.entries):
            problems.append(f"list shows {listed}, the store has {sorted(e.name for e in c.entries)}")
        kinds = {e.name: e.kind for e in c.entries}
        for r in rows:
            if (kinds.get(r["name"]) == "good") != (r["error"] is None) and kinds.get(r["name"]) != "any":
                problems.append(f"list: {r['name']!r} ({kinds.get(r['name'])}) has error {r['error']!r}")
    if c.command == "pull" and (models / ".partial").is_dir():
        left = set(os.listdir(models / ".partial"))
        for name, fate in c.partials.items():
            mine = name.startswith(f"{REPO_NAME}.gguf.")
            if fate == "keep" and not mine and name not in left:
                problems.append(f"pull removed {name}, a partial download of another model that may be resumed")
            if (fate == "stale" or mine) and name in left and o.code == 0:
                problems.append(f"pull left {name} (stale or superseded)")
        if locks := [n for n in left if n.endswith(".lock")]:
            problems.append(f"pull left locks: {locks}")
    problems += [f"left behind: {p}" for p in o.new_files if not _expected_new(c, p)]
    return [f"[{c.label}] {p}" for p in problems]


def _expected_new(c: StoreCase, path: str) -> bool:
    return path.startswith("cache/") or (c.command == "pull" and path == f"models/{REPO_NAME}.gguf")


def main(argv: list[str] | None = None) -> int:
    """`python -m tests.fuzz.store [--seed S] [--n N] [--model GGUF]`: a sweep, with totals per kind of outcome
    and of problem (wrong files touched among them)."""
    import argparse
    import collections
    import tempfile

    from tests.fuzz.harness import Harness

    p = argparse.ArgumentParser(prog="python -m tests.fuzz.store")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--model", type=Path, default=None, help="a real GGUF to link (default: the tiny Mixtral, converted once)")
    p.add_argument("--workers", type=int, default=None)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="fuzz-store-") as tmp:
        all_cases = cases(args.seed, args.n, Path(tmp), args.model)
        t0 = time.monotonic()
        with Harness(env=ENV, workers=args.workers) as h:
            outcomes = h.run(all_cases)
        seconds = time.monotonic() - t0
        problems = [p for o in outcomes for p in check(o)]
    kinds = collections.Counter(o.kind for o in outcomes)
    commands = collections.Counter(c.command for c in all_cases)
    wrong = sum("wrong files touched" in p or "opened" in p or "rm of" in p for p in problems)
    print(f"{len(outcomes)} cases ({', '.join(f'{k} {v}' for k, v in sorted(commands.items()))}) in {seconds:.0f} s: "
          + ", ".join(f"{k} {v}" for k, v in sorted(kinds.items())))
    print(f"problems: {len(problems)}, wrong files touched or opened: {wrong}")
    for line in problems[:40]:
        print(line[:500])
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
