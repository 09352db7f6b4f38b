"""Threads under load and prefill prediction, on this machine.

    .venv/bin/python benchmarks/runtime_tuning.py [GGUF] [--parts threads,duty,batch,prefill] [--rounds 5] [--gen-tokens 64]

Without GGUF it uses the demo model (built on first use).

- threads: decode tok/s with `--threads 1`, every count up to the physical cores, and automatic threads
  (LlamaBackend(threads=None), which re-checks hardware.auto_threads() at each measurement), with the machine
  idle and with one core kept busy by a child process spinning `while True: pass`. One backend per setting,
  loaded once; rounds interleave the settings; medians. Targets: auto within 5% of the best fixed count
  idle, within 10% with one core busy.
- duty: fixed 1 vs 2 threads against a child that keeps one core busy 30%, 50%, 80% of the time (10 ms
  periods): where a partly busy core starts to cost more than it gives (hardware.BUSY_CORE).
- batch: prefill of a 512-token prompt with 1 and 2 threads, idle and with one core busy.
- prefill: `localmix bench GGUF --prompt-tokens 512|4096 --json`, predicted beside measured (CPU only).

"Idle" is this process's view: other programs' load is reported with each table (uptime's load average and
what hardware.other_load() saw), since on a shared machine idle is not guaranteed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

SPIN = "while True: pass"
DUTY = """
import time, sys
d = float(sys.argv[1])
while True:
    t = time.perf_counter()
    while time.perf_counter() - t < d * 0.01: pass
    time.sleep((1 - d) * 0.01)
"""


def spinner(duty: float = 1.0) -> subprocess.Popen:
    code = SPIN if duty >= 1 else DUTY
    args = [sys.executable, "-c", code] + ([] if duty >= 1 else [str(duty)])
    proc = subprocess.Popen(args)
    time.sleep(0.5)  # scheduled and spinning before anything is measured
    return proc


def stop(proc: subprocess.Popen) -> None:
    proc.kill()
    proc.wait()


def backends(model: Path, settings: list[int | None], ctx: int = 1024) -> dict:
    from localmix.loader import load, prepare

    p = prepare(model, vram=0, ctx=ctx)
    return {s: load(p, threads=s) for s in settings}


def decode_speed(backend, prompt: list[int], gen_tokens: int) -> float:
    return backend.measure(prompt, gen_tokens).decode_tps


def label(setting: int | None) -> str:
    return "auto" if setting is None else f"--threads {setting}"


def interleaved(loaded: dict, rounds: int, measure) -> dict:
    """Median of `measure(backend)` per setting, the settings taking turns in each round."""
    speeds: dict = {s: [] for s in loaded}
    for _ in range(rounds):
        for s, backend in loaded.items():
            speeds[s].append(measure(backend))
    return {label(s): statistics.median(v) for s, v in speeds.items()}


def threads_part(model: Path, rounds: int, gen_tokens: int) -> list[dict]:
    from localmix.commands.bench import prompt_tokens
    from localmix.hardware import other_load, physical_cores

    settings: list[int | None] = [*range(1, physical_cores() + 1), None]
    loaded = backends(model, settings)
    prompt = prompt_tokens(loaded[1].tokenizer, 32)
    rows = []
    try:
        for state in ("idle", "one core busy"):
            proc = spinner() if state != "idle" else None
            try:
                speeds: dict = {s: [] for s in settings}
                chosen, seen = [], []
                load0 = os.getloadavg()[0]
                for _ in range(rounds):
                    for s in settings:
                        speeds[s].append(decode_speed(loaded[s], prompt, gen_tokens))
                        if s is None:
                            chosen.append(loaded[s].threads_now.decode)
                            seen.append(loaded[s].threads_now.busy)
                seen.append(other_load())
            finally:
                if proc:
                    stop(proc)
            med = {label(s): statistics.median(v) for s, v in speeds.items()}
            best = max(v for k, v in med.items() if k != "auto")
            rows.append({"state": state, "medians": med, "runs": {label(s): v for s, v in speeds.items()},
                         "auto_threads": chosen, "other_load": seen, "loadavg_1m": load0,
                         "auto_vs_best": med["auto"] / best})
            print(json.dumps(rows[-1]), file=sys.stderr)
    finally:
        for b in loaded.values():
            b.close()
    return rows


def duty_part(model: Path, rounds: int, gen_tokens: int) -> list[dict]:
    from localmix.commands.bench import prompt_tokens

    settings = [1, 2]
    loaded = backends(model, settings)
    prompt = prompt_tokens(loaded[1].tokenizer, 32)
    rows = []
    try:
        for duty in (0.3, 0.5, 0.8):
            proc = spinner(duty)
            try:
                med = interleaved(loaded, rounds, lambda b: decode_speed(b, prompt, gen_tokens))
            finally:
                stop(proc)
            rows.append({"duty": duty, "medians": med})
            print(json.dumps(rows[-1]), file=sys.stderr)
    finally:
        for b in loaded.values():
            b.close()
    return rows


def batch_part(model: Path, rounds: int) -> list[dict]:
    """Prefill of a 512-token prompt with 1 and 2 threads, idle and with one core busy: whether prompt
    batches want a different count than decode under load."""
    from localmix.commands.bench import prompt_tokens

    settings = [1, 2]
    loaded = backends(model, settings)
    prompt = prompt_tokens(loaded[1].tokenizer, 512)
    rows = []
    try:
        for state in ("idle", "one core busy"):
            proc = spinner() if state != "idle" else None
            try:
                med = interleaved(loaded, rounds, lambda b: b.measure(prompt, 1).prefill_tps)
            finally:
                if proc:
                    stop(proc)
            rows.append({"state": state, "medians": med})
            print(json.dumps(rows[-1]), file=sys.stderr)
    finally:
        for b in loaded.values():
            b.close()
    return rows


def prefill_part(model: Path, rounds: int) -> list[dict]:
    rows = []
    for n in (512, 4096):
        got = []
        for _ in range(rounds):
            out = subprocess.run([sys.executable, "-m", "localmix", "bench", str(model), "--vram", "0", "--ctx", str(max(4096, n + 128)),
                                  "--prompt-tokens", str(n), "--gen-tokens", "8", "--json"],
                                 capture_output=True, text=True, check=True).stdout
            r = json.loads(out)["results"][0]
            got.append((r["prefill_predicted"], r["prefill_measured"]))
        predicted = statistics.median(g[0] for g in got)
        measured = statistics.median(g[1] for g in got)
        rows.append({"prompt_tokens": n, "predicted": predicted, "measured": measured, "error": predicted / measured - 1,
                     "runs": [g[1] for g in got]})
        print(json.dumps(rows[-1]), file=sys.stderr)
    return rows


def markdown(results: dict) -> str:
    out = []
    if "threads" in results:
        rows = results["threads"]
        cols = list(rows[0]["medians"])
        out += ["| machine | " + " | ".join(f"`{c}`" if c != "auto" else "auto" for c in cols) + " | auto chose | auto / best |",
                "|---" * (len(cols) + 3) + "|"]
        for r in rows:
            chose = "/".join(str(c) for c in sorted(set(r["auto_threads"])))
            out.append(f"| {r['state']} (load avg {r['loadavg_1m']:.1f}) | " + " | ".join(f"{r['medians'][c]:.1f}" for c in cols)
                       + f" | {chose} | {r['auto_vs_best']:.0%} |")
        out.append("")
    if "duty" in results:
        out += ["| other program's core busy | `--threads 1` | `--threads 2` |", "|---|---|---|"]
        out += [f"| {r['duty']:.0%} | {r['medians']['--threads 1']:.1f} | {r['medians']['--threads 2']:.1f} |" for r in results["duty"]]
        out.append("")
    if "batch" in results:
        out += ["| prefill of 512 tokens | `--threads 1` | `--threads 2` |", "|---|---|---|"]
        out += [f"| {r['state']} | {r['medians']['--threads 1']:.0f} | {r['medians']['--threads 2']:.0f} |" for r in results["batch"]]
        out.append("")
    if "prefill" in results:
        out += ["| prompt tokens | predicted tok/s | measured tok/s | error |", "|---|---|---|---|"]
        out += [f"| {r['prompt_tokens']} | {r['predicted']:.0f} | {r['measured']:.0f} | {r['error']:+.0%} |" for r in results["prefill"]]
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", type=Path)
    ap.add_argument("--parts", default="threads,prefill")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--json", type=Path, help="write the raw results here too")
    args = ap.parse_args()
    model = args.model
    if model is None:
        from localmix.demo import ensure_demo

        model = ensure_demo()
    parts = args.parts.split(",")
    results: dict = {}
    if "threads" in parts:
        results["threads"] = threads_part(model, args.rounds, args.gen_tokens)
    if "duty" in parts:
        results["duty"] = duty_part(model, args.rounds, args.gen_tokens)
    if "batch" in parts:
        results["batch"] = batch_part(model, args.rounds)
    if "prefill" in parts:
        results["prefill"] = prefill_part(model, max(1, args.rounds // 2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
