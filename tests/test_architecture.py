"""The import graph, read from the sources: layers as ARCHITECTURE.md draws them, every arrow pointing
down or sideways within a layer, no cycle, and quantize/ never importing the runtime."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Module (or package prefix) -> layer, lowest first. ARCHITECTURE.md shows the same table.
LAYERS = {
    "quantize": 0,
    "localmix.errors": 1, "localmix.units": 1, "localmix.paths": 1, "localmix.text": 1, "localmix.llamacpp": 1, "localmix.rpc": 1,
    "localmix.modelfile": 2, "localmix.validate": 2, "localmix.prompt": 2,
    "localmix.model_info": 3, "localmix.quality": 3,
    "localmix.hardware": 4, "localmix.planner": 4, "localmix.tailor": 4,
    "localmix.describe": 5, "localmix.backends": 5, "localmix.tools": 5, "localmix.store": 5,
    "localmix.backends.llama": 6, "localmix.backends.isolated": 6, "localmix.tools.loop": 6, "localmix.models": 6,
    "localmix.reply": 7, "localmix.hub": 7, "localmix.demo": 7, "localmix.loader": 7, "localmix.evaluate": 7,
    "localmix.server": 7, "localmix.server.api": 7, "localmix.server.engine": 7,
    "localmix.server.app": 8,
    "localmix.app": 8,
    "localmix.commands": 9,
    "localmix.cli": 10, "localmix.__main__": 10, "localmix": 10,
}


def modules() -> dict[str, Path]:
    out = {}
    for pkg in ("localmix", "quantize"):
        for path in (ROOT / pkg).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


def layer(module: str) -> int:
    best = max((k for k in LAYERS if module == k or module.startswith(k + ".")), key=len)
    return LAYERS[best]


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Every project module `name` imports, at module level or inside functions."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        for t in targets:
            while t and t not in known:  # `import a.b.c` of a module a.b: the module
                t = t.rpartition(".")[0]
            if t and t != name and not name.startswith(t + "."):  # a module's own packages are loaded already
                found.add(t)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports(name, path, set(mods)) for name, path in mods.items()}


def test_every_module_has_a_layer():
    for name in modules():
        assert any(name == k or name.startswith(k + ".") for k in LAYERS), f"{name} has no layer in LAYERS"


def test_arrows_point_down():
    wrong = [f"{a} (layer {layer(a)}) imports {b} (layer {layer(b)})"
             for a, deps in graph().items() for b in deps if layer(b) > layer(a)]
    assert not wrong, "\n".join(wrong)


def test_no_cycles():
    g = graph()
    state: dict[str, int] = {}  # 1: on the stack, 2: done

    def visit(node, stack):
        state[node] = 1
        for nxt in sorted(g.get(node, ())):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for node in sorted(g):
        if node not in state:
            visit(node, [node])


def test_quantize_never_imports_the_runtime():
    g = graph()
    assert not [f"{a} -> {b}" for a, deps in g.items() if a.startswith("quantize") for b in deps if b.startswith("localmix")]


def test_nothing_below_commands_asks_the_user():
    """Questions are asked by commands only: input() appears nowhere else."""
    for name, path in modules().items():
        if layer(name) < LAYERS["localmix.commands"]:
            calls = [n for n in ast.walk(ast.parse(path.read_text()))
                     if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "input"]
            assert not calls, f"{name} calls input()"


def test_architecture_md_names_every_module():
    text = (ROOT / "ARCHITECTURE.md").read_text()
    for path in modules().values():
        rel = path.relative_to(ROOT).as_posix()
        folder = rel.rpartition("/")[0] + "/"
        shown = rel in text or (folder in text and (path.name == "__init__.py" or f"`{path.name}`" in text))
        assert shown, f"ARCHITECTURE.md does not mention {rel}"
