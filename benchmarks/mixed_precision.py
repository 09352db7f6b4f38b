"""Plan-aware mixed precision (issue 12): `quantize --bpw` and `quantize --for` against uniform types, measured.

    nice .venv/bin/python benchmarks/mixed_precision.py [--parts bpw,for,pareto,paper] [--chunks 10] [--runs 5]
        [--ram 16G] [--tps-factor 1.3] [--work /tmp/localmix-mixed] [--quality-work /tmp/localmix-quality]
        [--plot benchmarks/mixed_precision.png] [--role-weights FIT.json] [--json-out FILE]

On the upcycled SmolLM2 fixture (tests/support/checkpoints.py) with the imatrix `--imatrix auto` computes on it
(both shared with benchmarks/quality.py under --quality-work: built there if missing), every file is scored by
`localmix eval FILE --reference BF16 --chunks N --json` on the built-in evaluation text:

  bpw     uniform Q3_K_M, Q4_K_M, Q5_K_M (--imatrix FILE) beside `localmix quantize --bpw B --imatrix FILE` at each
          one's bits per weight: size, bpw, mean KLD, change (target: -10% at the same size within 1%).
  for     `localmix quantize --for 0,RAM --tps N --imatrix FILE`, N = --tps-factor x the measured decode of uniform
          Q4_K_M (`localmix bench FILE --vram 0 --json`, --runs runs alternating between files, medians): measured
          decode against the file's own prediction (localmix.target.predicted_decode_tps), and its mean KLD against
          the uniform type whose measured speed is closest. When N is out of reach of any file (the CLI says so in
          one line, naming the fastest file's predicted speed) the row says so, and the --for files of the
          Pareto part, at fractions of that fastest speed, stand in.
  pareto  measured tok/s against mean KLD for the uniform types Q2_K..Q8_0 and --for files at a few --tps targets
          (--fractions of the fastest file's predicted speed), plotted to --plot (matplotlib: benchmark-only).
  paper   the planner's model on sparse checkpoints with real Mixtral shapes (tests/support/sparse.py: weights are
          holes, so every error estimate is the Gaussian prior): 8x22B for a 24 GiB GPU and 96 GiB of RAM at 80 GB/s,
          8x7B for 12 GiB and 64 GiB: predicted decode of uniform Q4_K_M against the plan-aware file at Q4_K_M's
          error estimate (`--for` without --tps), from the library (quantize.sensitivity.estimate + localmix.tailor)
          and from `localmix quantize --for ... --dry-run`.

Files are made one at a time and removed once measured; eval results are kept in WORK/scores/, one file per
set of tensor types, so a rerun re-measures speed but not quality. Prints markdown tables on stdout.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.quality import STEP, build, evaluate  # noqa: E402  (the fixture, eval and timed CLI steps)
from benchmarks.quality import quantize as cli_quantize  # noqa: E402

# Q3_K_S is left out: on this fixture (rows of 576) it falls back to the same types as Q2_K, the same file.
UNIFORM = ["Q2_K", "Q3_K_M", "Q4_K_S", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0"]
BPW_SIZES = ["Q3_K_M", "Q4_K_M", "Q5_K_M"]
GiB = 1 << 30


# ---- the fixture, its reference and imatrix, files and their scores -----------------------------------------


@dataclass
class Work:
    root: Path  # our files and results.json
    quality: Path  # benchmarks/quality.py's work folder: the fixture, the BF16 reference, the imatrix
    chunks: int = 10
    ctx: int = 512
    cal_tokens: int = 20000
    fixture: str = "upcycled"  # or "tiny": quality.py's random Mixtral (no weights on any quantization grid)
    results: dict = field(default_factory=dict)

    def prepare(self) -> Work:
        from quantize.texts import calibration_text, eval_text

        self.root.mkdir(parents=True, exist_ok=True)
        self.src = build(self.fixture, self.quality)
        q = self.quality / self.fixture
        q.mkdir(parents=True, exist_ok=True)
        self.text, cal = q / "eval.txt", q / "calibration.txt"
        if not self.text.exists():
            self.text.write_text(eval_text(), encoding="utf-8")
        if not cal.exists():
            cal.write_text(calibration_text(), encoding="utf-8")
        self.ref = q / "ref-BF16.gguf"
        if not self.ref.exists():
            say(f"building the BF16 reference {self.ref}")
            check(cli_quantize(self.src, self.ref, "BF16"), "BF16 reference")
        self.imatrix = q / "auto-Q4_K_M.imatrix.gguf"  # what quality.py's `--imatrix auto` pass saves
        if not self.imatrix.exists():
            say("computing the imatrix with --imatrix auto (about a minute or two)")
            check(cli_quantize(self.src, q / "auto-Q4_K_M.gguf", "Q4_K_M", "--imatrix", "auto", "--calibration-text",
                               str(cal), "--calibration-tokens", str(self.cal_tokens)), "--imatrix auto")
        self.scores = self.root / "scores"  # one file per scored file: runs beside each other share them safely
        self.scores.mkdir(exist_ok=True)
        self.refresh()
        return self

    def refresh(self) -> None:
        legacy = self.root / "results.json"  # the single file of the first version
        for k, v in (json.loads(legacy.read_text()) if legacy.exists() else {}).items():
            self.results.setdefault(k, v)
        for p in sorted(self.scores.glob("*.json")):
            self.results.setdefault(p.stem, json.loads(p.read_text()))

    def known(self, k: str) -> bool:
        self.refresh()
        return k in self.results

    def importance(self):
        from quantize.imatrix import read_imatrix

        im = read_imatrix(self.imatrix)
        im.source = str(self.imatrix)
        return im

    def planned(self, out_type: str, types: dict | None = None) -> list:
        """convert.plan_tensors for the fixture: the tensors a file of that recipe (and overrides) has."""
        from quantize.checkpoint import open_checkpoint
        from quantize.convert import plan_tensors
        from quantize.metadata import read_hparams

        ck = open_checkpoint(self.src)
        try:
            return plan_tensors(ck, read_hparams(ck.config), out_type, has_imatrix=True, types=types)
        finally:
            ck.close()

    def key(self, types: dict[str, str]) -> str:
        text = json.dumps(sorted(types.items())) + f"|imatrix={self.imatrix.stat().st_size}|{self.chunks}x{self.ctx}"
        return hashlib.sha1(text.encode()).hexdigest()[:16]

    def scored(self, label: str, path: Path) -> dict:
        """Size and eval of a made file, cached by its tensor types; the file is removed afterwards."""
        types = file_types(path)
        k = self.key(types)
        if not self.known(k):
            t0 = time.perf_counter()
            e = evaluate(path, self.ref, self.text, self.chunks, self.ctx)
            self.results[k] = {"label": label, "bytes": path.stat().st_size, "kld": e["kld"]["mean"],
                               "kld_err": e["kld"].get("uncertainty", e["kld"].get("error")), "p99": e["kld"]["p99"],
                               "same_top1": e["same_top1"], "params": e.get("model", {}).get("parameters"),
                               "eval_seconds": time.perf_counter() - t0}
            tmp = self.scores / f".{k}.{os.getpid()}"
            tmp.write_text(json.dumps(self.results[k], indent=1))
            tmp.rename(self.scores / f"{k}.json")
            say(f"  {label}: {self.results[k]['bytes'] / 2**20:.0f} MiB, mean KLD {self.results[k]['kld']:.4f}")
        return self.results[k]

    def made(self, label: str, out_type: str, types: dict | None = None) -> dict:
        """A file from the library (convert with the imatrix, `types` over the recipe), scored; cached by types."""
        from quantize.convert import convert

        planned = {t.name: t.type.name for t in self.planned(out_type, types)}
        k = self.key(planned)
        if self.known(k):
            return self.results[k]
        out = self.root / f"{label}.gguf"
        t0 = time.perf_counter()
        convert(self.src, out, out_type, force=True, importance=self.importance(), types=types)
        say(f"  made {out.name} in {time.perf_counter() - t0:.1f} s")
        try:
            return self.scored(label, out)
        finally:
            out.unlink(missing_ok=True)


# --role-weights: quantize.sensitivity.ROLE_WEIGHTS replaced in the quantize process (a fit measured before it
# is pasted into sensitivity.py); the step is otherwise benchmarks/quality.py's.
WEIGHTED_STEP = """
import json, os
if os.environ.get("BENCH_ROLE_WEIGHTS"):
    from quantize import sensitivity
    sensitivity.ROLE_WEIGHTS.update(json.loads(os.environ["BENCH_ROLE_WEIGHTS"]))
""" + STEP
ROLE_WEIGHTS_OVERRIDE: dict = {}


def localmix(*args: str) -> dict:
    """One localmix command in a fresh interpreter: rc, seconds, peak_rss, stdout, stderr."""
    env = dict(os.environ, BENCH_ROLE_WEIGHTS=json.dumps(ROLE_WEIGHTS_OVERRIDE)) if ROLE_WEIGHTS_OVERRIDE else None
    r = subprocess.run([sys.executable, "-c", WEIGHTED_STEP, *args], capture_output=True, text=True, cwd=ROOT, env=env)
    stats = json.loads(r.stderr.strip().splitlines()[-1])
    stats["stdout"], stats["stderr"] = r.stdout, r.stderr
    return stats


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def check(r: dict, what: str) -> dict:
    if r["rc"]:
        raise SystemExit(f"{what} failed: {r['stderr'][-2000:]}")
    return r


def file_types(path: Path) -> dict[str, str]:
    from gguf import GGUFReader

    return {t.name: t.tensor_type.name for t in GGUFReader(path).tensors}


def file_meta(path: Path, prefix: str = "localmix.target.") -> dict:
    from gguf import GGUFReader

    out = {}
    for name, f in GGUFReader(path).fields.items():
        if name.startswith(prefix):
            v = f.contents()
            out[name.removeprefix(prefix)] = v
    return out


def bench(paths: list[Path], runs: int, ctx: int = 1024) -> list[dict]:
    """`localmix bench --vram 0 --json` on each file, `runs` rounds alternating between them: medians."""
    got: list[list[dict]] = [[] for _ in paths]
    for r in range(runs):
        for i, p in enumerate(paths):
            out = subprocess.run([sys.executable, "-m", "localmix", "bench", str(p), "--vram", "0", "--ctx", str(ctx), "--json"],
                                 capture_output=True, text=True, cwd=ROOT)
            if out.returncode:
                raise SystemExit(f"bench of {p.name} failed: {out.stderr[-2000:]}")
            got[i].append(json.loads(out.stdout)["results"][0])
        say(f"  bench round {r + 1}/{runs}: " + ", ".join(f"{p.stem} {g[-1]['decode_measured']:.1f}" for p, g in zip(paths, got)))
    keys = ("decode_predicted", "decode_measured")
    return [{k: statistics.median(x[k] for x in g) for k in keys} | {"runs": [x["decode_measured"] for x in g]} for g in got]


def cli_made(work: Work, name: str, *args: str) -> tuple[Path | None, dict]:
    """`localmix quantize SRC -o WORK/NAME.gguf --imatrix FILE ARGS` (a mixed file): the path, or None and the
    one-line refusal."""
    out = work.root / f"{name}.gguf"
    r = localmix("quantize", str(work.src), "-o", str(out), "--force", "--imatrix", str(work.imatrix), *args)
    if r["rc"]:
        lines = r["stderr"].strip().splitlines()
        return None, {"error": lines[0] if lines else "?", "seconds": r["seconds"]}
    say(f"  made {out.name} ({' '.join(args)}) in {r['seconds']:.1f} s")
    return out, {"seconds": r["seconds"], "stdout": r["stdout"]}


def pct(a: float, b: float) -> str:
    return f"{a / b - 1:+.1%}"


# ---- (a) --bpw at the sizes of uniform types ------------------------------------------------------------------


def part_bpw(work: Work) -> dict:
    rows = {}
    for t in BPW_SIZES:
        say(f"bpw at the size of {t}")
        u = work.made(f"uniform-{t}", t)
        tensors = work.planned(t)
        # --bpw counts tensor bytes (the header is the same in both files): the uniform file's, per weight
        bpw = sum(x.nbytes for x in tensors) * 8 / sum(x.n_elements for x in tensors)
        path, r = cli_made(work, f"bpw-{bpw:.2f}", "--bpw", f"{bpw:.4f}")
        row = {"uniform": u, "bpw_target": bpw}
        if path is None:
            row["error"] = r["error"]
        else:
            row["mixed"] = work.scored(f"bpw-{bpw:.2f}", path)
            row["mixed"]["meta"] = _jsonable(file_meta(path))
            row["mixed"]["quantize_seconds"] = r["seconds"]
            path.unlink(missing_ok=True)
        rows[t] = row
    return rows


def table_bpw(rows: dict) -> str:
    out = ["| size of | uniform: size / bpw / mean KLD | `--bpw B`: size / bpw / mean KLD | size | mean KLD | target |",
           "|---|---|---|---|---|---|"]
    for t, row in rows.items():
        u = row["uniform"]
        params = u["params"]
        us = f"{u['bytes'] / 2**20:.1f} MiB / {u['bytes'] * 8 / params:.3f} / {u['kld']:.4f}"
        if "mixed" not in row:
            out.append(f"| {t} | {us} | refused: {row['error']} | - | - | missed |")
            continue
        m = row["mixed"]
        ok = abs(m["bytes"] / u["bytes"] - 1) <= 0.01 and m["kld"] <= 0.9 * u["kld"]
        out.append(f"| {t} | {us} | {m['bytes'] / 2**20:.1f} MiB / {m['bytes'] * 8 / params:.3f} / {m['kld']:.4f} | "
                   f"{pct(m['bytes'], u['bytes'])} | {pct(m['kld'], u['kld'])} | {'met' if ok else 'missed'} |")
    return "\n".join(out)


def _jsonable(d: dict) -> dict:
    return {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in d.items()}


# ---- (b) and (c): --for 0,RAM against measured speed; the Pareto plot -------------------------------------------


def uniform_files(work: Work, types: list[str]) -> dict[str, Path]:
    """Uniform files kept for benching (made with the imatrix, scored once)."""
    from quantize.convert import convert

    paths = {}
    for t in types:
        p = work.root / f"uniform-{t}.gguf"
        if not p.exists():
            t0 = time.perf_counter()
            convert(work.src, p, t, force=True, importance=work.importance())
            say(f"  made {p.name} in {time.perf_counter() - t0:.1f} s")
        work.scored(f"uniform-{t}", p)
        paths[t] = p
    return paths


def part_for(work: Work, ram: str, runs: int, factor: float, fractions: list[float]) -> dict:
    say("uniform files for speed")
    uni = uniform_files(work, UNIFORM)
    say(f"bench of uniform Q4_K_M ({runs} runs)")
    q4 = bench([uni["Q4_K_M"]], runs)[0]
    target = factor * q4["decode_measured"]
    made: dict[str, dict] = {}
    path, r = cli_made(work, f"for-0-{ram}-x{factor:g}", "--for", f"0,{ram}", "--tps", f"{target:.2f}")
    made[f"{factor:g}x Q4_K_M measured ({target:.1f} tok/s)"] = {"path": path, "tps": target, **r}
    # --for without --tps: the fastest file at Q4_K_M's error estimate.
    fastest, r0 = cli_made(work, f"for-0-{ram}", "--for", f"0,{ram}")
    made["no --tps (fastest at Q4_K_M's error)"] = {"path": fastest, "tps": None, **r0}
    # The Pareto targets are fractions of the fastest file the planner predicts on this budget (the refusal of
    # an unreachable --tps names it), else of the fastest prediction among the files made.
    reach = re.search(r"predicted at ([0-9.]+) tok/s", made[next(iter(made))].get("error", ""))
    top = float(reach.group(1)) if reach else max(
        [float(file_meta(p["path"]).get("predicted_decode_tps", 0.0)) for p in made.values() if p["path"]] + [0.0])
    out_top = top
    if top:
        for f in fractions:
            n = f * top
            p, rr = cli_made(work, f"for-0-{ram}-f{f:g}", "--for", f"0,{ram}", "--tps", f"{n:.2f}")
            made[f"{f:g}x fastest prediction ({n:.1f} tok/s)"] = {"path": p, "tps": n, **rr}
    files = {k: v for k, v in made.items() if v["path"] is not None}
    say(f"bench: {len(uni)} uniform and {len(files)} --for files, {runs} rounds alternating")
    names = list(uni) + list(files)
    paths = list(uni.values()) + [v["path"] for v in files.values()]
    speeds = dict(zip(names, bench(paths, runs)))
    out = {"q4_first": q4, "target": target, "fastest_predicted": out_top, "uniform": {}, "for": {}}
    for t, p in uni.items():
        out["uniform"][t] = {**speeds[t], **work.scored(f"uniform-{t}", p)}
    for label, v in made.items():
        row = {"tps": v["tps"], "seconds": v["seconds"]}
        if v["path"] is None:
            row["error"] = v["error"]
        else:
            row |= {**speeds[label], **work.scored(v["path"].stem, v["path"]), "meta": _jsonable(file_meta(v["path"]))}
            v["path"].unlink(missing_ok=True)
        out["for"][label] = row
    return out


def table_for(res: dict) -> str:
    out = ["| file | target tok/s | size | predicted (file) | predicted (bench) | measured (runs) | measured vs predicted | "
           "mean KLD | closest uniform by speed: tok/s, KLD | KLD vs it |", "|---|---|---|---|---|---|---|---|---|---|"]
    for label, r in res["for"].items():
        tps = f"{r['tps']:.1f}" if r["tps"] else "-"
        if "error" in r:
            out.append(f"| {label} | {tps} | refused: {r['error']} | | | | | | | |")
            continue
        pred = float(r["meta"].get("predicted_decode_tps", "nan"))
        near = min(res["uniform"], key=lambda t: abs(res["uniform"][t]["decode_measured"] - r["decode_measured"]))
        u = res["uniform"][near]
        out.append(f"| {label} | {tps} | {r['bytes'] / 2**20:.0f} MiB | {pred:.1f} | {r['decode_predicted']:.1f} | "
                   f"{r['decode_measured']:.1f} ({_span(r)}) | {pct(r['decode_measured'], pred)} | {r['kld']:.4f} | "
                   f"{near}: {u['decode_measured']:.1f}, {u['kld']:.4f} | {pct(r['kld'], u['kld'])} |")
    out += ["", "| uniform (imatrix) | size | predicted | measured (runs) | measured vs predicted | mean KLD |",
            "|---|---|---|---|---|---|"]
    for t, u in res["uniform"].items():
        out.append(f"| {t} | {u['bytes'] / 2**20:.0f} MiB | {u['decode_predicted']:.1f} | {u['decode_measured']:.1f} ({_span(u)}) | "
                   f"{pct(u['decode_measured'], u['decode_predicted'])} | {u['kld']:.4f} |")
    return "\n".join(out)


def _span(r: dict) -> str:
    return f"{min(r['runs']):.0f}-{max(r['runs']):.0f}"


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    uni = res["uniform"]
    xs, ys = [uni[t]["kld"] for t in uni], [uni[t]["decode_measured"] for t in uni]
    ax.errorbar(xs, ys, yerr=_spread(list(uni.values())), fmt="o-", color="tab:blue", capsize=2, label="uniform (imatrix)")
    for t, x, y in zip(uni, xs, ys):
        ax.annotate(t, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    rows = [r for r in res["for"].values() if "kld" in r]
    mixed = [(r["kld"], r["decode_measured"], r["tps"]) for r in rows]
    if mixed:
        ax.errorbar([m[0] for m in mixed], [m[1] for m in mixed], yerr=_spread(rows), fmt="s", color="tab:red", capsize=2,
                    label="--for 0,RAM (--tps N)")
        for x, y, n in mixed:
            ax.annotate(f"--tps {n:.0f}" if n else "no --tps", (x, y), textcoords="offset points", xytext=(4, -10), fontsize=8,
                        color="tab:red")
    ax.text(0.99, 0.01, "median of the runs; bars: their range", transform=ax.transAxes, ha="right", va="bottom", fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("mean KLD against BF16 (log)")
    ax.set_ylabel("measured decode, tok/s (CPU only)")
    ax.set_title("Upcycled SmolLM2 MoE: speed against quality")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    say(f"wrote {path}")


def _spread(rows: list[dict]) -> list[list[float]]:
    """Error bars from the median down to the slowest run and up to the fastest."""
    return [[r["decode_measured"] - min(r["runs"]) for r in rows], [max(r["runs"]) - r["decode_measured"] for r in rows]]


# ---- (d) on paper: Mixtral shapes ------------------------------------------------------------------------------


PAPER = [("8x22B", "24G", "96G", 5.0), ("8x7B", "12G", "64G", None)]  # the target for 8x22B: 5 tok/s


def part_paper(root: Path, bandwidth: str = "80GB/s", ctx: int = 4096) -> dict:
    from localmix.units import parse_bandwidth, parse_size
    from tests.support.sparse import make_sparse_mixtral

    out = {}
    for shape, vram, ram, tps in PAPER:
        folder = root / f"sparse-{shape}"
        if not (folder / "config.json").exists():
            make_sparse_mixtral(folder, shape)
        row: dict = {"vram": vram, "ram": ram, "bandwidth": bandwidth, "ctx": ctx}
        try:
            row["library"] = paper_library(folder, parse_size(vram), parse_size(ram), parse_bandwidth(bandwidth), ctx, tps)
        except (ImportError, AttributeError, TypeError, ValueError, KeyError) as e:  # still moving: the dry run is the other route
            row["library_error"] = f"{type(e).__name__}: {e}"
        t0 = time.perf_counter()
        r = localmix("quantize", str(folder), "-o", str(root / f"dry-{shape}.gguf"), "--for", f"{vram},{ram}",
                     "--ram-bandwidth", bandwidth, "--ctx", str(ctx), "--dry-run")
        row["dry_run"] = {"rc": r["rc"], "seconds": time.perf_counter() - t0, "stdout": r["stdout"],
                          "stderr": r["stderr"].strip().splitlines()[:-1][-3:]}
        say(f"  {shape}: dry run rc {r['rc']} in {row['dry_run']['seconds']:.1f} s")
        out[shape] = row
    return out


def paper_library(folder: Path, vram: int, ram: int, bandwidth: float, ctx: int, tps: float | None) -> dict:
    """Uniform Q4_K_M's plan against tailor's file at Q4_K_M's error estimate, on the budget `--for` gives;
    with `tps`, also the file that reaches it (or tailor's refusal)."""
    from localmix import tailor as tl
    from localmix.errors import LocalmixError
    from localmix.loader import machine_and_budget
    from localmix.planner import plan
    from quantize import sensitivity
    from quantize.checkpoint import open_checkpoint
    from quantize.convert import plan_tensors
    from quantize.metadata import read_hparams

    ck = open_checkpoint(folder)
    try:
        hp = read_hparams(ck.config)
        tensors = plan_tensors(ck, hp, "Q4_K_M")
    finally:
        ck.close()
    units = sensitivity.estimate(tensors)
    names = {u.name for u in units}
    reference = {t.name: t.type for t in tensors if t.name in names}
    base = tl.info_from_plan(hp, tensors, folder.name)
    _, budget = machine_and_budget(vram, ram, bandwidth)
    uniform = plan(base, budget, ctx)
    t0 = time.perf_counter()
    got = tl.tailor(base, units, reference, budget, ctx)
    seconds = time.perf_counter() - t0
    at_tps = None
    if tps is not None:
        try:
            f = tl.tailor(base, units, reference, budget, ctx, tps=tps)
            at_tps = {"tps": tps, "bytes": f.info.weight_bytes, "decode": f.plan.decode_tps, "error": f.error,
                      "reference_error": f.reference_error}
        except LocalmixError as e:
            at_tps = {"tps": tps, "refused": str(e)}
    return {
        "at_tps": at_tps,
        "gpu_bandwidth": budget.gpu_bandwidth, "cpu_bandwidth": budget.cpu_bandwidth,
        "uniform": {"bytes": base.weight_bytes, "decode": uniform.decode_tps, "gpu_layers": uniform.n_gpu_layers,
                    "vram": uniform.vram_total, "error": sensitivity.total_error(units, reference)},
        "tailored": {"bytes": got.info.weight_bytes, "decode": got.plan.decode_tps, "gpu_layers": got.plan.n_gpu_layers,
                     "vram": got.plan.vram_total, "error": got.error, "reference_error": got.reference_error,
                     "types": _type_counts(got.types, units)},
        "seconds": seconds,
        "params": sum(t.n_elements for t in tensors),
    }


def _type_counts(types: dict, units) -> dict:
    """Per role, how many units got each type: the shape of the choice."""
    out: dict[str, dict[str, int]] = {}
    for u in units:
        t = types.get(u.name)
        name = getattr(t, "name", str(t))
        out.setdefault(u.role, {}).setdefault(name, 0)
        out[u.role][name] += 1
    return out


def table_paper(res: dict) -> str:
    out = ["| model | budget | uniform Q4_K_M: size, GPU layers, predicted decode | plan-aware (`--for`, no --tps): size, "
           "GPU layers, predicted decode | speed-up | error estimate: plan-aware / Q4_K_M |", "|---|---|---|---|---|---|"]
    for shape, row in res.items():
        budget = f"{row['vram']} GPU, {row['ram']} RAM, {row['bandwidth']}"
        lib = row.get("library")
        if lib is None:
            out.append(f"| Mixtral {shape} | {budget} | library: {row.get('library_error')} | | | |")
            continue
        u, t = lib["uniform"], lib["tailored"]
        n = lib["params"]
        out.append(f"| Mixtral {shape} | {budget} | {u['bytes'] / GiB:.1f} GiB ({u['bytes'] * 8 / n:.2f} bpw), {u['gpu_layers']}, "
                   f"{u['decode']:.2f} tok/s | {t['bytes'] / GiB:.1f} GiB ({t['bytes'] * 8 / n:.2f} bpw), {t['gpu_layers']}, "
                   f"{t['decode']:.2f} tok/s | {t['decode'] / u['decode']:.2f}x | {t['error'] / t['reference_error']:.3f} |")
    for shape, row in res.items():
        a = (row.get("library") or {}).get("at_tps")
        if a and "refused" in a:
            out.append(f"\n{shape} at {a['tps']:g} tok/s: refused: {a['refused']}")
        elif a:
            out.append(f"\n{shape} at {a['tps']:g} tok/s (`--tps {a['tps']:g}`): {a['bytes'] / GiB:.1f} GiB, predicted "
                       f"{a['decode']:.2f} tok/s, error estimate {a['error'] / a['reference_error']:.2f}x uniform Q4_K_M's.")
    for shape, row in res.items():
        lib = row.get("library")
        if lib:
            out.append(f"\n{shape} plan-aware types per role: " + "; ".join(
                f"{role} " + ", ".join(f"{n} {t}" for t, n in sorted(c.items())) for role, c in lib["tailored"]["types"].items()))
        d = row["dry_run"]
        out.append(f"\n`localmix quantize sparse-{shape} --for {row['vram']},{row['ram']} --ram-bandwidth {row['bandwidth']} "
                   f"--ctx {row['ctx']} --dry-run` (exit {d['rc']}, {d['seconds']:.1f} s):\n\n```\n"
                   + (d["stdout"].rstrip() or "\n".join(d["stderr"])) + "\n```")
    return "\n".join(out)


# ---- main ------------------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="bpw,for,paper", help="bpw, for (with the Pareto plot), paper")
    ap.add_argument("--fixture", choices=["upcycled", "tiny"], default="upcycled",
                    help="tiny: quality.py's random Mixtral, whose weights sit on no quantization grid (its own --work folder)")
    ap.add_argument("--chunks", type=int, default=10)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--runs", type=int, default=5, help="bench rounds (alternating between files)")
    ap.add_argument("--ram", default="16G")
    ap.add_argument("--tps-factor", type=float, default=1.3)
    ap.add_argument("--fractions", default="0.9,0.95,0.99", help="--tps targets for the Pareto plot, of the fastest prediction")
    ap.add_argument("--work", type=Path, default=Path("/tmp/localmix-mixed"))
    ap.add_argument("--quality-work", type=Path, default=Path("/tmp/localmix-quality"))
    ap.add_argument("--plot", type=Path, default=ROOT / "benchmarks" / "mixed_precision.png")
    ap.add_argument("--role-weights", type=Path, help="JSON of ROLE_WEIGHTS to quantize with instead of sensitivity.py's "
                    "(a dict, or fit_role_weights.py's --json-out)")
    ap.add_argument("--json-out", type=Path)
    ap.add_argument("--replot", type=Path, metavar="JSON", help="only draw --plot again from an earlier --json-out")
    args = ap.parse_args()
    if args.replot:
        plot(json.loads(args.replot.read_text())["for"], args.plot)
        return
    if args.role_weights:
        w = json.loads(args.role_weights.read_text())
        ROLE_WEIGHTS_OVERRIDE.update(w.get("weights", w))
        from quantize import sensitivity

        sensitivity.ROLE_WEIGHTS.update(ROLE_WEIGHTS_OVERRIDE)  # for the library calls of the paper part
        say(f"ROLE_WEIGHTS from {args.role_weights}: {ROLE_WEIGHTS_OVERRIDE}")
    parts = {p for p in args.parts.split(",") if p}
    everything: dict = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "chunks": args.chunks, "ctx": args.ctx}
    tables = []
    work = None
    if parts & {"bpw", "for"}:
        root = args.work if args.fixture == "upcycled" else args.work / args.fixture
        work = Work(root, args.quality_work, args.chunks, args.ctx, fixture=args.fixture).prepare()
    if "bpw" in parts:
        everything["bpw"] = part_bpw(work)
        tables.append("### `--bpw` at the sizes of uniform types (same imatrix)\n\n" + table_bpw(everything["bpw"]))
        print(tables[-1] + "\n", flush=True)
    if "for" in parts:
        res = part_for(work, args.ram, args.runs, args.tps_factor, [float(f) for f in args.fractions.split(",") if f])
        everything["for"] = res
        tables.append(f"### `--for 0,{args.ram}` on this machine (bench --vram 0, median of {args.runs}, alternating)\n\n"
                      + table_for(res))
        print(tables[-1] + "\n", flush=True)
        plot(res, args.plot)
    if "paper" in parts:
        args.work.mkdir(parents=True, exist_ok=True)
        everything["paper"] = part_paper(args.work)
        tables.append("### On paper: Mixtral shapes (sparse checkpoints, prior error estimates)\n\n" + table_paper(everything["paper"]))
        print(tables[-1] + "\n", flush=True)
    if args.json_out:
        args.json_out.write_text(json.dumps(everything, indent=1, default=str))


if __name__ == "__main__":
    main()
