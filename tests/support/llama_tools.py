"""llama.cpp's own command-line tools (llama-quantize, llama-imatrix, llama-perplexity), built from the
sources the installed llama-cpp-python vendors, so that tests compare against exactly the llama.cpp
localmix runs on. Built once per version into a cache folder (~/.cache/localmix-tests/llama-tools-VERSION,
or $LOCALMIX_LLAMA_TOOLS), under a file lock (parallel test runs build once), in a temporary folder renamed
into place (an interrupted build leaves nothing that looks finished).

The source is llama-cpp-python's sdist from the package index (`pip download --no-binary :all:`); the build
takes a few minutes on two cores (cmake + ninja, CPU only, static, just these three targets).
Tests that use it are marked `llama_tools`; they are skipped when no compiler or cmake is found, or the
sdist cannot be fetched (offline), and fail when a build that could run fails."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from contextlib import contextmanager
from importlib.metadata import version
from pathlib import Path

import pytest

TOOLS = ("llama-quantize", "llama-imatrix", "llama-perplexity")
CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF",
    "-DLLAMA_CURL=OFF", "-DBUILD_SHARED_LIBS=OFF",
)


def llama_cpp_version() -> str:
    return version("llama-cpp-python")


def tools_dir() -> Path:
    if env := os.environ.get("LOCALMIX_LLAMA_TOOLS"):
        return Path(env).expanduser()
    return Path.home() / ".cache" / "localmix-tests" / f"llama-tools-{llama_cpp_version()}"


def tool(name: str) -> Path:
    """The path of one tool, built first if need be (pytest.skip where it cannot be built here)."""
    assert name in TOOLS, name
    return ensure_tools() / name


def ensure_tools() -> Path:
    d = tools_dir()
    if _complete(d):
        return d
    missing = [t for t in ("cmake", "ninja", "c++", "cc") if shutil.which(t) is None]
    if missing:
        pytest.skip(f"cannot build llama.cpp's tools: {', '.join(missing)} not found")
    d.parent.mkdir(parents=True, exist_ok=True)
    with _locked(d.parent / f".{d.name}.lock"):
        if not _complete(d):  # another process may have built it while we waited
            build(d)
    return d


def _complete(d: Path) -> bool:
    return all(os.access(d / t, os.X_OK) for t in TOOLS)


@contextmanager
def _locked(path: Path):
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def build(dest: Path) -> None:
    """Fetch the sdist of the installed llama-cpp-python, build the tools, move them to `dest`."""
    ver = llama_cpp_version()
    with tempfile.TemporaryDirectory(prefix=".llama-tools-", dir=dest.parent) as tmp:
        work = Path(tmp)
        src = _source(ver, work)
        build_dir = work / "build"
        _run(["cmake", "-S", str(src), "-B", str(build_dir), "-G", "Ninja", *CMAKE_FLAGS], work / "cmake.log")
        jobs = str(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
        _run(["cmake", "--build", str(build_dir), "-j", jobs, "--target", *TOOLS], work / "build.log")
        out = work / "out"
        out.mkdir()
        for t in TOOLS:
            shutil.copy2(build_dir / "bin" / t, out / t)
        (out / "BUILD-INFO").write_text(f"llama-cpp-python {ver} sdist, vendor/llama.cpp\ncmake -G Ninja {' '.join(CMAKE_FLAGS)}\n")
        if dest.exists():  # an incomplete folder (a tool deleted by hand): replaced whole
            shutil.rmtree(dest)
        os.replace(out, dest)


def _source(ver: str, work: Path) -> Path:
    dl = work / "sdist"
    r = subprocess.run(
        [sys.executable, "-m", "pip", "download", f"llama-cpp-python=={ver}", "--no-binary", ":all:", "--no-deps",
         "-d", str(dl)],
        capture_output=True, text=True,
    )
    archives = sorted(dl.glob("llama_cpp_python-*.tar.gz")) if dl.is_dir() else []
    if r.returncode != 0 or not archives:
        pytest.skip(f"cannot fetch llama-cpp-python {ver}'s sources: {(r.stderr or r.stdout).strip().splitlines()[-1:]}")
    with tarfile.open(archives[0]) as tar:
        tar.extractall(work, filter="data")
    src = work / archives[0].name.removesuffix(".tar.gz") / "vendor" / "llama.cpp"
    if not (src / "CMakeLists.txt").is_file():
        raise RuntimeError(f"no vendor/llama.cpp in {archives[0].name}")
    return src


def _run(cmd: list[str], log: Path) -> None:
    with open(log, "w") as f:
        r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    if r.returncode != 0:
        tail = log.read_text(errors="replace").splitlines()[-30:]
        raise RuntimeError(f"{' '.join(cmd[:3])} failed ({r.returncode}):\n" + "\n".join(tail))


def run_tool(name: str, *args: str | Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run a tool; its output (llama.cpp logs a lot) is returned, not printed."""
    return subprocess.run([str(tool(name)), *map(str, args)], capture_output=True, text=True, timeout=timeout)
