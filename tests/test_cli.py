"""The command line itself: help, version, and a start-up that imports nothing heavy."""

import subprocess
import sys

from tests.support.cli import run_cli


def test_help_lists_commands():
    r = run_cli("--help")
    assert r.returncode == 0 and "quantize" in r.stdout
    r = run_cli("quantize", "--help")
    assert r.returncode == 0 and "--type" in r.stdout and "Q4_K_M" in r.stdout


def test_no_command_prints_help_and_fails():
    r = run_cli()
    assert r.returncode == 2 and "usage: localmix" in r.stdout


def test_help_imports_no_heavy_module():
    """`localmix --help` must answer at once: building the parser may not import llama.cpp, numpy,
    torch, transformers or huggingface_hub."""
    code = (
        "import sys, localmix.cli as c; c.build_parser();"
        "heavy = [m for m in ('numpy', 'llama_cpp', 'torch', 'transformers', 'huggingface_hub', 'gguf', 'rich')"
        " if m in sys.modules]; print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_cli_type_list_is_the_recipe_table():
    """The CLI keeps its own copy of the type names so that --help imports nothing heavy."""
    from localmix.commands.quantize import TYPES
    from quantize.recipe import OUT_TYPES

    assert TYPES == tuple(OUT_TYPES)


def test_usage_errors_are_one_line(tmp_path):
    """Out-of-range numbers are refused by the parser, as one line (no usage block) and status 2."""
    model = str(tmp_path / "any.gguf")  # never opened: the flags are refused first
    for args, expect in [
        (("run", model, "hi", "--threads", "0"), "--threads: 0 is out of range"),
        (("run", model, "hi", "--threads", "-1"), "--threads: -1 is out of range"),
        (("run", model, "hi", "--max-tokens", "0"), "--max-tokens: 0 is out of range"),
        (("run", model, "hi", "--temperature", "nan"), "--temperature: nan is out of range"),
        (("run", model, "hi", "--top-p", "5"), "--top-p: 5 is out of range"),
        (("run", model, "hi", "--ctx", "x"), "--ctx: not a token count"),
        (("bench", model, "--gen-tokens", "0"), "--gen-tokens: 0 is out of range"),
        (("bench", model, "--threads", "100000"), "--threads: 100000 is out of range"),
        (("plan", model, "--vram", "lots"), "not a size"),
        (("run",), "the following arguments are required"),
    ]:
        r = run_cli(*args)
        err = r.stderr.strip()
        assert r.returncode == 2 and len(err.splitlines()) == 1 and expect in err, (args, r.stderr)


def test_a_reader_that_went_away_is_not_an_error(smol):
    """`localmix list | head`: when stdout's reader is gone, localmix stops quietly (status 1, as Python's
    documentation advises and rich does), without "Exception ignored" or a traceback: for rich's output
    (`list`) and for plain writes (`run --help` is argparse's, `run` streams with sys.stdout)."""
    import os

    for args in (["list"], ["run", str(smol), "hi", "--print-prompt"], ["plan", "--help"]):
        read_end, write_end = os.pipe()
        os.close(read_end)  # the reader is gone before the first write
        try:
            r = subprocess.run([sys.executable, "-m", "localmix", *args], stdout=write_end, stderr=subprocess.PIPE,
                               text=True, timeout=120)
        finally:
            os.close(write_end)
        assert r.returncode in (0, 1) and r.stderr == "", (args, r.stderr)  # argparse ends --help with 0
