"""The layer rule, checked on the source: imports flow one way and no module imports itself in a circle.

flux2_lora.py, train.py  ->  trainer/, evaluation/  ->  inference/, data_tools/  ->  common/
"""

import ast
from pathlib import Path

from helpers import REPO

PACKAGES = ("common", "data_tools", "inference", "evaluation", "trainer")
# what each package may import from ours (besides itself)
ALLOWED = {
    "common": set(),
    "data_tools": {"common"},
    "inference": {"common"},
    "evaluation": {"common", "data_tools", "inference"},
    "trainer": {"common", "data_tools", "inference"},
}


def _imports(path: Path) -> set[str]:
    """Modules of ours that a file imports, at any depth (function-level imports count too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in found if name.split(".")[0] in PACKAGES}


def _modules() -> dict[str, Path]:
    return {
        ".".join(p.relative_to(REPO).with_suffix("").parts): p
        for package in PACKAGES
        for p in (REPO / package).glob("*.py")
    }


def test_every_package_imports_only_the_layers_below_it():
    wrong = []
    for module, path in _modules().items():
        package = module.split(".")[0]
        for name in _imports(path):
            target = name.split(".")[0]
            if target != package and target not in ALLOWED[package]:
                wrong.append(f"{module} imports {name}")
    assert not wrong, wrong


def test_no_import_cycles_between_modules():
    modules = _modules()
    graph = {
        m: {n for n in _imports(p) if n in modules}
        | {n.rsplit(".", 1)[0] for n in _imports(p) if n.rsplit(".", 1)[0] in modules}
        for m, p in modules.items()
    }
    graph = {m: deps - {m} for m, deps in graph.items()}
    state: dict[str, int] = {}

    def visit(node, trail):
        if state.get(node) == 1:
            raise AssertionError(
                "import cycle: " + " -> ".join(trail[trail.index(node) :] + [node])
            )
        if state.get(node) == 2:
            return
        state[node] = 1
        for dep in sorted(graph[node]):
            visit(dep, trail + [node])
        state[node] = 2

    for module in sorted(graph):
        visit(module, [])


def test_the_rule_itself_is_enforced(tmp_path):
    """A module of the base that imports a higher layer is caught (the check can fail)."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from trainer.recipe import run\n")
    assert _imports(bad) == {"trainer.recipe", "trainer.recipe.run"}


def test_the_command_hub_table_matches_the_packages():
    import importlib

    from flux2_lora import TABLE

    for name, (module, help_text) in TABLE.items():
        assert name in importlib.import_module(module).COMMANDS and help_text
    for module in {m for m, _ in TABLE.values()}:
        assert set(importlib.import_module(module).COMMANDS) <= set(TABLE), module
