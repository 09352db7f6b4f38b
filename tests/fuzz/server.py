"""The fork server behind `harness.Harness`: reads a JSON list of cases per line on stdin, runs each in a
forked child, answers one JSON list of results per line on stdout. Started with `python -m tests.fuzz.server N`.

It imports localmix's commands (and llama.cpp) before forking, so a case starts in milliseconds. It stays
single-threaded so that forking it is safe."""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
import time

# Everything a case may import, imported once, before any fork.
import llama_cpp  # noqa: F401

import localmix.cli as cli
from localmix.cli import COMMANDS

for _module, _ in COMMANDS.values():
    __import__(f"localmix.commands.{_module}")
# ...and what they import lazily (to keep `localmix --help` fast): a second per case otherwise.
for _module in ("localmix.loader", "localmix.describe", "rich.console", "rich.table", "rich.markup"):
    __import__(_module)


def _files(root: str) -> set[str]:
    out = set()
    for d, dirs, names in os.walk(root, followlinks=False):
        for n in names + [x for x in dirs if os.path.islink(os.path.join(d, x))]:
            out.add(os.path.relpath(os.path.join(d, n), root))
    return out


def _child(case: dict, out_path: str, err_path: str) -> None:
    os.setsid()
    os.chdir(case["cwd"])
    fd_in = os.open(os.devnull, os.O_RDONLY)
    os.dup2(fd_in, 0)
    os.dup2(os.open(out_path, os.O_WRONLY), 1)
    os.dup2(os.open(err_path, os.O_WRONLY), 2)
    sys.stdin = open(0, closefd=False)
    code = 70
    try:
        code = cli.main(case["argv"])
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # noqa: BLE001 - an uncaught error is what the fuzzer is looking for
        import traceback

        traceback.print_exc()
        code = 70
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except BaseException:  # noqa: BLE001 - a closed pipe at exit is the case's business
            pass
    os._exit(code if isinstance(code, int) else 1)


def _run(cases: list[dict], workers: int) -> list[dict]:
    results: list[dict | None] = [None] * len(cases)
    running: dict[int, tuple[int, float, str, str, set]] = {}  # pid -> (index, start, out, err, files before)
    todo = list(range(len(cases)))
    tmp = tempfile.mkdtemp(prefix="fuzz-io-")
    while todo or running:
        while todo and len(running) < workers:
            i = todo.pop(0)
            case = cases[i]
            out, err = os.path.join(tmp, f"{i}.out"), os.path.join(tmp, f"{i}.err")
            open(out, "w").close()
            open(err, "w").close()
            before = _files(case["cwd"])
            pid = os.fork()
            if pid == 0:
                _child(case, out, err)
            running[pid] = (i, time.monotonic(), out, err, before)
        time.sleep(0.005)
        for pid, (i, start, out, err, before) in list(running.items()):
            hung = False
            done, status = os.waitpid(pid, os.WNOHANG)
            if done == 0:
                if time.monotonic() - start < cases[i]["timeout"]:
                    continue
                hung = True
                os.killpg(pid, signal.SIGKILL)
                _, status = os.waitpid(pid, 0)
            del running[pid]
            code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
            sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) and not hung else None
            with open(out, errors="replace") as f:
                stdout = f.read(200_000)
            with open(err, errors="replace") as f:
                stderr = f.read(200_000)
            results[i] = {
                "code": None if hung else code, "signal": sig, "hung": hung, "stdout": stdout, "stderr": stderr,
                "seconds": round(time.monotonic() - start, 3),
                "new_files": sorted(_files(cases[i]["cwd"]) - before),
            }
            os.unlink(out)
            os.unlink(err)
    os.rmdir(tmp)
    return results


def main() -> None:
    workers = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    for line in sys.stdin:
        print(json.dumps(_run(json.loads(line), workers)), flush=True)


if __name__ == "__main__":
    main()
