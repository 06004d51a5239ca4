"""The package's floors, read from the source: no import runs upward, none between siblings, no cycle.

Floors, lowest first (a module may import its own package and any lower floor):
 -1  errors, units, outputs, lifetime    the error base class, sizes, output locks, child processes' end:
                                         imported by anyone
  0  parallel, patches                   process groups, Megatron-Core patches
  1  models, data                        what a Qwen3 model is; tokens and datasets
  2  checkpoints                         checkpoints on disk, for everyone above
  3  convert                             HF <-> torch_dist
  4  lora                                adapters; their merged export is a conversion with a delta
  5  training, evaluation, plot          jobs on top of the floors below
  6  train, demo, torchrun, rl           entry points; GRPO (a job on top of training)
  7  plan                                the planner: plans training and GRPO runs
Each ``__main__`` module is an entry point of its package's floor.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "megatron_patch"

FLOORS = {
    "": -1, "errors": -1, "units": -1, "outputs": -1, "lifetime": -1,
    "parallel": 0, "patches": 0,
    "models": 1, "data": 1,
    "checkpoints": 2,
    "convert": 3,
    "lora": 4,
    "training": 5, "evaluation": 5, "plot": 5,
    "train": 6, "demo": 6, "torchrun": 6, "rl": 6,
    "plan": 7,
}

# Imports of our own modules inside a function, each with why it cannot be at the top. All
# are entry points deferring Megatron-Core (about 5 s to import) or lm-eval until the arguments
# have parsed, so that --help and a bad argument answer at once, and the warning filters are set
# before Megatron-Core's import-time warnings fire.
DEFERRED_IMPORTS = {
    ("megatron_patch.train", "megatron_patch.training.loop"): "Megatron-Core",
    ("megatron_patch.rl.__main__", "megatron_patch.rl.loop"): "Megatron-Core",
    ("megatron_patch.rl.__main__", "megatron_patch.training.preflight"): "Megatron-Core",
    ("megatron_patch.convert.__main__", "megatron_patch.convert.run"): "Megatron-Core",
    ("megatron_patch.lora.__main__", "megatron_patch.lora.export"): "Megatron-Core",
    ("megatron_patch.evaluation.run", "megatron_patch.evaluation.megatron_lm"): "lm-eval and Megatron-Core",
}


def _module_name(path: Path) -> str:
    parts = ("megatron_patch", *path.relative_to(PACKAGE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _own_imports(path: Path):
    """(imported module, at top level?) for each import of megatron_patch in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top = {id(node) for node in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("megatron_patch"):
            names = [f"{node.module}.{a.name}" for a in node.names]
            yield node.module, names, id(node) in top
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("megatron_patch"):
                    yield alias.name, [], id(node) in top


def _all_modules() -> dict[str, Path]:
    return {_module_name(path): path for path in PACKAGE.rglob("*.py")}


def _resolve(module: str, names: list[str], modules: dict) -> str:
    """``from a.b import c`` imports module a.b.c when c is a module, else a.b."""
    submodules = [name for name in names if name in modules]
    return submodules[0] if submodules else module


def _floor(module: str) -> tuple[int, str]:
    parts = module.split(".")
    area = parts[1] if len(parts) > 1 else ""
    assert area in FLOORS, f"{module}: give its area a floor in this test"
    return FLOORS[area], area


def _edges():
    modules = _all_modules()
    for name, path in modules.items():
        for imported, names, top in _own_imports(path):
            yield name, _resolve(imported, names, modules), top


def test_no_import_runs_upward_or_sideways():
    wrong = []
    for source, target, _ in _edges():
        (source_floor, source_area), (target_floor, target_area) = _floor(source), _floor(target)
        if source_area == target_area:
            continue
        if target_floor >= source_floor and target_floor >= 0:
            wrong.append(f"{source} -> {target}")
    assert not wrong, wrong


def test_own_modules_are_imported_at_the_top_except_deferred_entry_points():
    inside = {(source, target) for source, target, top in _edges() if not top}
    assert inside == set(DEFERRED_IMPORTS), sorted(inside ^ set(DEFERRED_IMPORTS))
    for source, _ in inside:
        assert source.endswith("__main__") or source in ("megatron_patch.train", "megatron_patch.evaluation.run")


def test_no_import_cycle():
    graph: dict[str, set[str]] = {}
    for source, target, top in _edges():
        if top and source != target:
            graph.setdefault(source, set()).add(target)
    state: dict[str, int] = {}

    def visit(node, trail):
        state[node] = 1
        for nxt in graph.get(node, ()):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(trail[trail.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for node in list(graph):
        if node not in state:
            visit(node, [node])


def test_importing_the_package_sets_no_warning_filters():
    """Warning filters are an entry point's choice, not a side effect of ``import megatron_patch``."""
    import subprocess
    import sys

    # Upstream packages set filters of their own when imported; ours come after them.
    code = ("import warnings, torch, numpy, megatron.core; before = list(warnings.filters); "
            "import megatron_patch.training.loop, megatron_patch.convert.run, megatron_patch.lora.export; "
            "print(warnings.filters == before)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "True"
