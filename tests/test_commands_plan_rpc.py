"""`localmix plan --rpc ...` as a user runs it on the upcycled fixture: workers planned without contact
(--rpc-ram), a live worker probed for its memory, a worker that is not running, and bad worker flags."""

import json
import re
import shlex

import gguf
import pytest

from localmix.commands.common import NETWORK_NAMES
from localmix.planner import NETWORKS
from localmix.units import GiB
from tests.support.cli import one_line_error, run_cli
from tests.support.workers import free_port, workers

NOBODY = "127.0.0.1:1"  # nothing listens on port 1: a plan that contacted it would fail


def plan_json(smol, *flags):
    r = run_cli("plan", str(smol), "--vram", "0", "--json", *flags)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.fixture(scope="module")
def half_ram(smol):
    """A RAM budget that holds only about half of the model (weights and KV cache)."""
    alone = plan_json(smol, "--ram", "8G")
    return alone, f'{(alone["ram"]["weights"] + alone["ram"]["kv_cache"]) // 2 // 2**20}M'  # a bare number is GiB


def test_a_worker_planned_without_contact_takes_what_ram_cannot_hold(smol, half_ram):
    alone, ram = half_ram
    d = plan_json(smol, "--ram", ram, "--rpc", NOBODY, "--rpc-ram", "1G", "--rpc-network", "10gbe")
    [remote] = d["remotes"]
    assert remote["name"] == f"RPC0[{NOBODY}]" and remote["memory"] == GiB and remote["kind"] == "cpu"
    assert (remote["hop_seconds"], remote["link_bandwidth"]) == NETWORKS["10gbe"]
    assert remote["bandwidth"] == d["budget"]["cpu_decode_bandwidth"]  # no --rpc-bandwidth: this machine's
    placed = {t["name"] for t in d["tensors"] if t["device"] == remote["name"]}
    assert placed == set(remote["tensors"]) and placed
    assert sum(t["bytes"] for t in d["tensors"] if t["name"] in placed) == remote["used"]
    assert d["ram"]["weights"] + d["ram"]["kv_cache"] <= d["budget"]["ram"] < alone["ram"]["weights"]
    assert d["ram"]["weights"] + remote["used"] == alone["ram"]["weights"]
    assert placed.isdisjoint(d["cpu_experts"])
    layers = {int(n.split(".")[1]) for n in placed}
    assert all(set(d["layers"][i]["experts"].values()) == {remote["name"]} for i in layers)  # whole layers

    args = shlex.split(run_cli("plan", str(smol), "--vram", "0", "--ram", ram, "--rpc", NOBODY, "--rpc-ram", "1G",
                               "--rpc-network", "10gbe", "--llama-args").stdout)
    assert args[:4] == ["-ngl", "0", "--rpc", NOBODY] and "-ts" not in args  # no local GPU: the layers stay here anyway
    ot = [v.rsplit("=", 1) for f, v in zip(args[::2], args[1::2], strict=True) if f == "-ot"]
    there = [re.compile(p) for p, target in ot if target == remote["name"]]
    names = [t.name for t in gguf.GGUFReader(smol).tensors]
    assert {n for n in names if any(p.search(n) for p in there)} == placed

    table = " ".join(run_cli("plan", str(smol), "--vram", "0", "--ram", ram, "--rpc", NOBODY, "--rpc-ram", "1G").stdout.split())
    assert f"Worker RPC0[{NOBODY}]: CPU 1.0 GiB" in table and "hop 350 µs, link 117 MB/s" in table  # 1gbe by default
    assert f"┃ {NOBODY} ┃" in table and "│ worker │ experts │" in table


def test_a_worker_is_not_used_when_ram_holds_the_model_and_reads_it_quicker(smol):
    r = run_cli("plan", str(smol), "--vram", "0", "--ram", "8G", "--rpc", NOBODY, "--rpc-ram", "1G", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["remotes"][0]["used"] == 0 and not any(t["device"].startswith("RPC") for t in d["tensors"])
    assert f"nothing placed on {NOBODY}" in r.stderr


def test_a_live_worker_is_probed_for_its_memory(smol, half_ram):
    _, ram = half_ram
    with workers(1) as [w]:
        d = plan_json(smol, "--ram", ram, "--rpc", w.endpoint, "--rpc-network", "loopback", "--rpc-bandwidth", "20GB/s")
    cpu = d["remotes"][-1]
    assert cpu["endpoint"] == w.endpoint and cpu["kind"] == "cpu"
    assert 0 < cpu["memory"] < 1024 * GiB and cpu["bandwidth"] == pytest.approx(18e9)  # 0.9 of it, as --ram-bandwidth
    assert cpu["used"] > 0


def test_a_worker_that_is_not_running_is_one_line(smol):
    port = free_port()
    r = run_cli("plan", str(smol), "--rpc", f"127.0.0.1:{port}")
    assert one_line_error(r, f"worker 127.0.0.1:{port} is not running"), r.stderr


@pytest.mark.parametrize(("flags", "expect", "code"), [
    (["--rpc", "host:port"], "--rpc", 2),
    (["--rpc", NOBODY, "--rpc-ram", "lots"], "not a size: 'lots'", 2),
    (["--rpc", NOBODY, "--rpc-ram", "1G,2G"], "--rpc-ram has 2 sizes for 1 workers", 1),
    (["--rpc", NOBODY, "--rpc-vram", "1G,"], "not a size: ''", 2),
    (["--rpc", NOBODY, "--rpc-network", "5gbe"], "--rpc-network", 2),
    (["--rpc", NOBODY, "--rpc-ram", "1G", "--rpc-bandwidth", "80"], "not a memory bandwidth: '80'", 2),
    (["--rpc-ram", "1G"], "--rpc-ram describes workers: give them with --rpc", 1),
])
def test_bad_worker_flags_are_one_line(smol, flags, expect, code):
    r = run_cli("plan", str(smol), *flags)
    assert one_line_error(r, expect, code=code), r.stderr


def test_the_network_names_are_the_planners():
    assert set(NETWORK_NAMES) == set(NETWORKS)


@pytest.mark.parametrize("command", [["run", "{model}", "Hello"], ["bench", "{model}"], ["serve", "{model}", "--port", "0"]])
def test_every_command_that_loads_takes_the_worker_flags(smol, command):
    port = free_port()
    args = [str(smol) if a == "{model}" else a for a in command]
    assert one_line_error(run_cli(*args, "--rpc", f"127.0.0.1:{port}"), f"worker 127.0.0.1:{port} is not running")
    assert one_line_error(run_cli(*args, "--rpc-vram", "8G"), "--rpc-vram describes workers", code=1)
