"""Decode speed with experts on loopback workers (`localmix worker`) against the same model run locally,
each beside the planner's prediction; and the bytes sent per token beside the planner's hop_bytes.

    .venv/bin/python benchmarks/rpc.py [GGUF] [--remote-layers 20] [--rounds 3] [--gen-tokens 64]

Without GGUF it uses the demo model (built on first use). Three configurations, side by side in one run:
all local; the experts of --remote-layers layers on one worker; the same layers' experts split over two
workers. The RAM budget is what the local plan needs less those layers' experts, so the planner must put
them on the workers (the same total either way). Each configuration is loaded once (its own workers: a
worker serves one client at a time) and measured --rounds times in turn, the configurations interleaved;
best and median are reported, with the plan's decode_tps (the link measured by rpc.measure_link, as
`--rpc` does) and measured / predicted.

Bytes per token: a second pass loads each worker configuration again through a byte-counting TCP proxy
(tests/support/proxy.py) in front of each worker (the link given, not measured through it: the placement
is the memory budgets'), decodes 8 and then 8 + --gen-tokens tokens after the same prompt, and divides the
difference of the bytes each way by --gen-tokens (the prompt and the load drop out); per remote layer,
that is beside planner.hop_bytes(model), what the planner counts for one layer's hop. Prints a markdown table for benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # for tests.support: the workers and the proxy the suite uses

PROMPT = "Mixture-of-Experts models route each token through a few of many feed-forward experts. "


@dataclass
class Config:
    label: str
    endpoints: tuple[str, ...]
    planned: object = None
    backend: object = None
    speeds: list[float] = field(default_factory=list)


def layer_of(name: str) -> int:
    return int(re.match(r"blk\.(\d+)\.", name).group(1))


def remote_layers(plan) -> int:
    return len({layer_of(n) for names in plan.remote.values() for n in names})


def budgets(path: Path, ctx: int, layers: int) -> tuple[int, int]:
    """(RAM, each worker's share): the RAM leaves `layers` layers' experts out (the local plan's need less
    their bytes, plus half a layer's experts of slack); each of two workers may hold 2/3 of them, so that
    both get some (left to itself the planner puts them all on the worker whose link measured quicker)."""
    from localmix.loader import prepare

    p = prepare(path, vram=0, ctx=ctx)
    per_layer: dict[int, int] = {}
    for t in p.info.tensors:
        if t.role == "expert":
            per_layer[t.layer] = per_layer.get(t.layer, 0) + t.nbytes
    layer_bytes = max(per_layer.values())
    return sum(p.plan.ram.values()) - layers * layer_bytes + layer_bytes // 2, 2 * layers * layer_bytes // 3


def prompt_tokens(backend, n: int = 64) -> list[int]:
    base = backend.tokenizer.tokenize(PROMPT, special=False)
    return (base * (n // len(base) + 1))[:n]


def planned(path: Path, endpoints: tuple[str, ...], ram: int, each: int, ctx: int, **rpc):
    """prepare()'s plan (workers probed, links measured unless `rpc` says), each worker's memory held to
    `each` when there are several."""
    from dataclasses import replace

    from localmix.loader import prepare
    from localmix.planner import plan

    if not endpoints:
        return prepare(path, vram=0, ctx=ctx)
    p = prepare(path, vram=0, ram=ram, ctx=ctx, rpc=endpoints, **rpc)
    if len(endpoints) > 1:
        budget = replace(p.budget, remotes=tuple(replace(r, memory=min(r.memory, each)) for r in p.budget.remotes))
        p = replace(p, budget=budget, plan=plan(p.info, budget, ctx, p.kv_type))
    return p


def load(p, threads: int):
    from localmix.loader import load as load_planned

    return load_planned(p, threads=threads)


def speeds(configs: list[Config], rounds: int, gen_tokens: int) -> None:
    for r in range(rounds):
        order = configs if r % 2 == 0 else configs[::-1]
        for c in order:
            got = c.backend.measure(prompt_tokens(c.backend), gen_tokens)
            c.speeds.append(got.decode_tps)
            print(f"  round {r + 1} {c.label}: {got.decode_tps:.1f} tok/s", file=sys.stderr)


def bytes_per_token(path: Path, targets: tuple[str, ...], ram: int, each: int, ctx: int, threads: int, short: int, long: int
                    ) -> tuple[float, float, int]:
    """(bytes to the workers, bytes back, per decoded token; remote layers), through proxies in front of `targets`."""
    from contextlib import ExitStack

    from tests.support.proxy import counting_proxy

    with ExitStack() as stack:
        proxies = [stack.enter_context(counting_proxy(t)) for t in targets]
        # the link as the table says, no measurement through the proxy: the placement is the memory budgets'
        p = planned(path, tuple(x.endpoint for x in proxies), ram, each, ctx, rpc_network="loopback", rpc_bandwidth=10e9)
        backend = load(p, threads)
        try:
            tokens = prompt_tokens(backend)
            counted = []
            for n in (short, long):
                for x in proxies:
                    x.reset()
                backend.measure(tokens, n)
                counted.append([sum(x.counts()[way] for x in proxies) for way in (0, 1)])
        finally:
            backend.close()
    up, down = ((counted[1][way] - counted[0][way]) / (long - short) for way in (0, 1))
    return up, down, remote_layers(p.plan)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", type=Path)
    ap.add_argument("--remote-layers", type=int, default=20, help="layers whose experts go to the workers (default 20)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=None, help="the client's threads (default: this machine's cores)")
    ap.add_argument("--worker-threads", type=int, default=1)
    ap.add_argument("--no-bytes", action="store_true", help="skip the bytes-per-token pass")
    a = ap.parse_args()
    os.environ.setdefault("LOCALMIX_HOME", tempfile.mkdtemp())

    from localmix.hardware import detect
    from localmix.planner import hop_bytes
    from tests.support.workers import workers

    model = a.model
    if model is None:
        from localmix.demo import ensure_demo

        model = ensure_demo()
    threads = a.threads or detect().cores
    ram, each = budgets(model, a.ctx, a.remote_layers)
    t0 = time.perf_counter()
    with workers(3, threads=a.worker_threads) as ws:
        configs = [Config("local", ()), Config("1 worker", (ws[0].endpoint,)), Config("2 workers", (ws[1].endpoint, ws[2].endpoint))]
        try:
            for c in configs:
                c.planned = planned(model, c.endpoints, ram, each, a.ctx)
                c.backend = load(c.planned, threads)
                print(f"  loaded {c.label}: {remote_layers(c.planned.plan)} remote layers", file=sys.stderr)
            speeds(configs, a.rounds, a.gen_tokens)
        finally:
            for c in configs:
                if c.backend is not None:
                    c.backend.close()
        sent = {} if a.no_bytes else {c.label: bytes_per_token(model, c.endpoints, ram, each, a.ctx, threads, 8, 8 + a.gen_tokens)
                                      for c in configs if c.endpoints}
    info = configs[0].planned.info
    print(f"\n{info.name} ({Path(info.path).name}), {info.n_layer} layers, {threads} client thread(s), workers on "
          f"127.0.0.1 with --threads {a.worker_threads}; RAM budget {ram / 2**20:.0f} MiB for the worker runs; "
          f"{a.rounds} rounds of {a.gen_tokens} tokens; {time.perf_counter() - t0:.0f} s\n")
    print("| configuration | remote layers | decode tok/s best | median | predicted | median / predicted |")
    print("|---|---|---|---|---|---|")
    for c in configs:
        pred = c.planned.plan.decode_tps
        med = statistics.median(c.speeds)
        print(f"| {c.label} | {remote_layers(c.planned.plan)} | {max(c.speeds):.1f} | {med:.1f} | {pred:.1f} | {med / pred:.2f} |")
    print("\nWorkers as planned (links measured by rpc.measure_link): " + "; ".join(
        f"{c.label}: {r.endpoint} hop {r.hop_seconds * 1e6:.0f} us, {r.bandwidth / 1e9:.1f} GB/s, "
        f"{len({layer_of(n) for n in c.planned.plan.remote.get(r.name, ())})} layers"
        for c in configs for r in c.planned.plan.remotes))
    if sent:
        print("\n| configuration | remote layers | bytes per token (to workers + back) | per remote layer | planner: hop_bytes "
              "| measured / planner |")
        print("|---|---|---|---|---|---|")
        hop = hop_bytes(info)
        for label, (up, down, layers) in sent.items():
            per_layer = (up + down) / layers
            print(f"| {label} | {layers} | {up + down:,.0f} ({up:,.0f} + {down:,.0f}) | {per_layer:,.0f} | {hop:,} "
                  f"| {per_layer / hop:.2f} |")


if __name__ == "__main__":
    main()
