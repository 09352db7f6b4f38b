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
