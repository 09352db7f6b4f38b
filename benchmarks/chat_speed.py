"""Generation speed inside `localmix chat` against `localmix run`, same model, prompt and settings.

    .venv/bin/python benchmarks/chat_speed.py [GGUF] [--runs 3] [--max-tokens 200] [--threads N]

Without GGUF it uses the demo model (built on first use). `run` is timed from its --verbose eval rate;
the app runs headless under Textual's pilot, rendering streamed text as it would on screen (the pilot only
types the prompt; the reply is awaited with plain sleeps), and is timed by the same backend counters
(llama.cpp's). Greedy decoding, so both produce the same tokens.
Runs alternate; medians are reported. Target: chat >= 95% of run. Both use the same fixed thread count
(default: the physical cores): the automatic choice samples the machine's load at each reply, so two runs
could differ by the moment they sampled rather than by the app's own work, which is what this measures.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPT = "Write a long story about a lighthouse keeper who finds a message in a bottle."


def run_speed(model: Path, max_tokens: int, threads: int) -> float:
    out = subprocess.run(
        [sys.executable, "-m", "localmix", "run", str(model), PROMPT, "--temperature", "0", "--max-tokens", str(max_tokens),
         "--ctx", "1024", "--threads", str(threads), "--verbose"], capture_output=True, text=True, check=True,
    ).stderr
    return float(re.search(r"eval rate:\s+([0-9.]+) tokens/s", out.split("prompt eval rate")[1]).group(1))


async def chat_speed(model: Path, max_tokens: int, home: Path, threads: int | None = None) -> float:
    from localmix.app.chat import ChatApp, PromptInput
    from localmix.commands.chat import make_prepare
    from localmix.store import Store

    store = Store(Path(tempfile.mkdtemp(dir=home)) / "chats.sqlite3")  # a fresh conversation each run
    app = ChatApp(make_prepare(ctx=1024, default_model=model, threads=threads), store, model.stem)
    async with app.run_test(size=(120, 40)) as pilot:
        while app.backend is None and not app.load_error:
            await pilot.pause(0.05)
        store.update_settings(app.chat.id, temperature=0.0, max_tokens=max_tokens, seed=1)
        app.chat = store.chat(app.chat.id)
        app.query_one("#prompt", PromptInput).text = PROMPT
        await pilot.press("enter")
        await pilot.pause(0.1)
        while app.generating:  # a plain sleep: pilot.pause() would post a callback to every widget and force a
            await asyncio.sleep(0.2)  # screen refresh each time, CPU the app on a real terminal never spends
        speed = app.last_stats.gen_tps
    app.backend.close()
    store.close()
    return speed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", type=Path)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=200)
    ap.add_argument("--threads", type=int, default=None, help="decode threads for both (default: physical cores)")
    a = ap.parse_args()
    import psutil

    threads = a.threads or psutil.cpu_count(logical=False) or 1
    home = Path(tempfile.mkdtemp())
    os.environ.setdefault("LOCALMIX_HOME", str(home))
    model = a.model
    if model is None:
        from localmix.demo import ensure_demo

        model = ensure_demo()
    runs, chats = [], []
    for i in range(a.runs):
        for which in (("run", "chat") if i % 2 == 0 else ("chat", "run")):
            t0 = time.perf_counter()
            if which == "run":
                runs.append(run_speed(model, a.max_tokens, threads))
            else:
                chats.append(asyncio.run(chat_speed(model, a.max_tokens, home, threads)))
            print(f"  {which}: {(runs if which == 'run' else chats)[-1]:.1f} tok/s ({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    r, c = statistics.median(runs), statistics.median(chats)
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"model {model.name}, {threads} threads, load average {load}: run {r:.1f} tok/s, chat {c:.1f} tok/s, chat/run {c / r:.1%}")


if __name__ == "__main__":
    main()
