"""`localmix serve` measured: decode speed through the API against `localmix run`, and a bounded load run.

    .venv/bin/python benchmarks/serve.py [GGUF] [--runs 3] [--max-tokens 200] [--clients 32] [--seconds 120]

Without GGUF it uses the demo model (built on first use). The server is `localmix serve` in a child
process on 127.0.0.1 (port chosen by the system), as a user starts it.

speed: `run --verbose`'s eval rate against the decode rate a streaming client sees (completion tokens
after the first, over the time from the first content chunk to the last), greedy, same prompt, through
a plain HTTP reader (as curl or an editor reads the stream) and through the official `openai` client
(whose own parsing runs in this process, on the same cores as the server); rounds rotate the order,
medians reported. Target: API >= 95% of run.

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


def raw_speed(url: str, model: str, max_tokens: int) -> float:
    """The same through a plain HTTP reader (as curl or an editor reads a stream): the server's share alone."""
    import http.client
    import json
    from urllib.parse import urlsplit

    where = urlsplit(url)
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": PROMPT}], "temperature": 0, "seed": 1,
                       "max_tokens": max_tokens, "stream": True, "stream_options": {"include_usage": True}})
    conn = http.client.HTTPConnection(where.hostname, where.port)
    conn.request("POST", f"{where.path}/chat/completions", body, {"Content-Type": "application/json"})
    first = last = None
    tokens = 0
    for line in conn.getresponse():
        if not line.startswith(b"data: {"):
            continue
        if b'"content":"' in line and b'"content":""' not in line:
            last = time.perf_counter()
            first = first or last
        if b'"choices":[]' in line:
            tokens = json.loads(line[6:])["usage"]["completion_tokens"]
    conn.close()
    return (tokens - 1) / (last - first)


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
    tenths = [statistics.median(r for _, r in rss[k * tenth:(k + 1) * tenth]) for k in range(len(rss) // tenth)]
    return {"outcomes": dict(outcomes), "errors": errors[:5], "rss_first": first, "rss_last": last, "tenths": tenths,
            "rss_max": max(r for _, r in rss), "alive": proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", type=Path)
    ap.add_argument("--runs", type=int, default=3, help="rounds of the speed comparison")
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
            got: dict[str, list[float]] = {"run": [], "HTTP": [], "openai": []}
            measure = {"run": lambda: run_speed(model, a.max_tokens, env),
                       "HTTP": lambda: raw_speed(url, client.served, a.max_tokens),
                       "openai": lambda: api_speed(client, a.max_tokens)}
            order = list(measure)
            for i in range(a.runs):
                for which in order[i % 3:] + order[:i % 3]:  # each in each position once every three rounds
                    got[which].append(measure[which]())
                    print(f"  {which}: {got[which][-1]:.1f} tok/s", file=sys.stderr)
            r = statistics.median(got["run"])
            print(f"speed, model {model.name}, {a.runs} rounds (medians): run {r:.1f} tok/s; "
                  + "; ".join(f"API through {k} {statistics.median(v):.1f} tok/s ({statistics.median(v) / r:.1%} of run)"
                              for k, v in got.items() if k != "run")
                  + "; all: " + "; ".join(f"{k} {', '.join(f'{x:.1f}' for x in v)}" for k, v in got.items()))
        if "load" in parts:
            t0 = time.perf_counter()
            out = load(client_factory, a.clients, a.seconds, proc.pid)
            mib = 2**20
            print(f"load, {a.clients} streaming clients for {a.seconds:.0f} s (queue {a.queue}), {time.perf_counter() - t0:.0f} s: "
                  f"{out['outcomes']}; server RSS {out['rss_first'] / mib:.0f} MiB first tenth, {out['rss_last'] / mib:.0f} MiB "
                  f"last tenth, {out['rss_max'] / mib:.0f} MiB max; server alive: {out['alive']}")
            print(f"  server RSS by tenths of the run (MiB): {', '.join(f'{r / mib:.0f}' for r in out['tenths'])}")
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
