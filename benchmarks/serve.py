"""`localmix serve` measured: decode speed through the API against `localmix run`, and a bounded load run.

    .venv/bin/python benchmarks/serve.py [GGUF] [--runs 3] [--max-tokens 200] [--clients 32] [--seconds 120]

Without GGUF it uses the demo model (built on first use). The server is `localmix serve` in a child
process on 127.0.0.1 (port chosen by the system), as a user starts it.

speed: `run --verbose`'s eval rate against the decode rate a streaming `openai` client sees (completion
tokens after the first, over the time from the first content chunk to the last), greedy, same prompt;
runs alternate, medians reported. Target: API >= 95% of run.

load: `--clients` threads, each sending streaming requests one after another until `--seconds` are up
(every fourth one hangs up after two chunks, to exercise cancellation); every request must complete or
be refused with 503, nothing else; the server's resident memory is sampled every half second. Target:
no error, no crash, flat memory (the last tenth's median within 5% of the first tenth's).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

PROMPT = "Write a long story about a lighthouse keeper who finds a message in a bottle."


def start_server(model: Path, queue: int, env: dict) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "localmix", "serve", str(model), "--port", "0", "--ctx", "2048",
                             "--queue", str(queue)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    line = proc.stdout.readline()
    found = re.search(r"http://\S+", line)
    if not found:
        proc.kill()
        raise SystemExit(f"the server did not say where it listens: {line!r}")
    return proc, found.group(0).rstrip("/.")


def run_speed(model: Path, max_tokens: int, env: dict) -> float:
    out = subprocess.run(
        [sys.executable, "-m", "localmix", "run", str(model), PROMPT, "--temperature", "0", "--max-tokens", str(max_tokens),
         "--ctx", "2048", "--verbose"], capture_output=True, text=True, check=True, env=env,
    ).stderr
    return float(re.search(r"eval rate:\s+([0-9.]+) tokens/s", out.split("prompt eval rate")[1]).group(1))


def api_speed(client, max_tokens: int) -> float:
    stream = client.chat.completions.create(
        model=client.served, messages=[{"role": "user", "content": PROMPT}], temperature=0, seed=1,
        max_tokens=max_tokens, stream=True, stream_options={"include_usage": True})
    first = last = None
    tokens = 0
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            last = time.perf_counter()
            first = first or last
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    return (tokens - 1) / (last - first)


def load(client_factory, clients: int, seconds: float, pid: int) -> dict:
    import openai
    import psutil

    outcomes: Counter = Counter()
    errors: list[str] = []
    lock = threading.Lock()
    deadline = time.monotonic() + seconds
    rss: list[tuple[float, int]] = []
    proc = psutil.Process(pid)
    stop = threading.Event()

    def sample() -> None:
        t0 = time.monotonic()
        while not stop.is_set():
            rss.append((time.monotonic() - t0, proc.memory_info().rss))
            stop.wait(0.5)

    def worker(k: int) -> None:
        client = client_factory()
        n = 0
        while time.monotonic() < deadline:
            n += 1
            hang_up = n % 4 == 0
            try:
                stream = client.chat.completions.create(
                    model=client.served, messages=[{"role": "user", "content": f"Tell me about the number {k * 1000 + n}."}],
                    max_tokens=24, stream=True)
                for i, _chunk in enumerate(stream):
                    if hang_up and i >= 2:
                        stream.close()
                        break
                kind = "hung up" if hang_up else "completed"
            except openai.APIStatusError as e:
                kind = "503" if e.status_code == 503 else f"HTTP {e.status_code}"
                if e.status_code == 503:
                    time.sleep(0.2)  # as a client honouring Retry-After would, a little
                else:
                    with lock:
                        errors.append(str(e)[:200])
            except Exception as e:  # noqa: BLE001 - a benchmark counts every failure, whatever it is
                kind = type(e).__name__
                with lock:
                    errors.append(f"{type(e).__name__}: {str(e)[:200]}")
            with lock:
                outcomes[kind] += 1

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 300)
    stop.set()
    sampler.join()
    tenth = max(1, len(rss) // 10)
    first = statistics.median(r for _, r in rss[:tenth])
    last = statistics.median(r for _, r in rss[-tenth:])
    return {"outcomes": dict(outcomes), "errors": errors[:5], "rss_first": first, "rss_last": last,
            "rss_max": max(r for _, r in rss), "alive": proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", type=Path)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=200)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=120)
    ap.add_argument("--queue", type=int, default=8)
    ap.add_argument("--parts", default="speed,load")
    a = ap.parse_args()
    import openai

    env = dict(os.environ)
    env.setdefault("LOCALMIX_HOME", tempfile.mkdtemp())
    os.environ["LOCALMIX_HOME"] = env["LOCALMIX_HOME"]
    model = a.model
    if model is None:
        from localmix.demo import ensure_demo

        model = ensure_demo()
    proc, url = start_server(model, a.queue, env)
    try:
        def client_factory():
            client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=600)
            client.served = client.models.list().data[0].id
            return client

        parts = a.parts.split(",")
        if "speed" in parts:
            client = client_factory()
            api_speed(client, 8)  # the server's first request warms what a first request warms
            runs, apis = [], []
            for i in range(a.runs):
                for which in (("run", "api") if i % 2 == 0 else ("api", "run")):
                    if which == "run":
                        runs.append(run_speed(model, a.max_tokens, env))
                    else:
                        apis.append(api_speed(client, a.max_tokens))
                    print(f"  {which}: {(runs if which == 'run' else apis)[-1]:.1f} tok/s", file=sys.stderr)
            r, s = statistics.median(runs), statistics.median(apis)
            print(f"speed, model {model.name}: run {r:.1f} tok/s, API {s:.1f} tok/s, API/run {s / r:.1%} "
                  f"(runs {', '.join(f'{x:.1f}' for x in runs)}; API {', '.join(f'{x:.1f}' for x in apis)})")
        if "load" in parts:
            t0 = time.perf_counter()
            out = load(client_factory, a.clients, a.seconds, proc.pid)
            mib = 2**20
            print(f"load, {a.clients} streaming clients for {a.seconds:.0f} s (queue {a.queue}), {time.perf_counter() - t0:.0f} s: "
                  f"{out['outcomes']}; server RSS {out['rss_first'] / mib:.0f} MiB first tenth, {out['rss_last'] / mib:.0f} MiB "
                  f"last tenth, {out['rss_max'] / mib:.0f} MiB max; server alive: {out['alive']}")
            for e in out["errors"]:
                print(f"  error: {e}")
    finally:
        proc.send_signal(2)
        try:
            code = proc.wait(30)
            print(f"server exit status after Ctrl-C: {code}")
        except subprocess.TimeoutExpired:
            proc.kill()
            print("server did not stop within 30 s of Ctrl-C")


if __name__ == "__main__":
    main()
