"""dvc.yaml: each stage depends on exactly the library code its module imports.

DVC does not follow Python imports, so dvc.yaml lists them by hand; this test walks each
stage module's imports (module level and inside functions, transitively through pipeline/)
and fails when a stage misses a file it runs, or lists library code it never imports (an
over-broad dependency reruns the stage after edits that cannot change its outputs).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]

# Files a module reads at run time without importing them.
DATA_DEPS = {"pipeline/report/page.py": ["pipeline/report/assets"],
             "pipeline/laws/size_calibration.py": ["pipeline/laws/size_calibration.json"]}


def _module_file(dotted: str) -> Path | None:
    """The file of module `dotted` (a package's __init__.py), or None outside pipeline/."""
    if dotted != "pipeline" and not dotted.startswith("pipeline."):
        return None
    base = REPO.joinpath(*dotted.split("."))
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    return None


def _imports(path: Path) -> set[Path]:
    """The pipeline/ files that the module at `path` imports anywhere in its body."""
    found: set[Path] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from pipeline.qdg import gradients` imports a module; `from pipeline.core.files import x` a name
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            # importing a.b.c runs a/__init__, a/b/__init__ and a/b/c
            for i in range(1, len(parts) + 1):
                f = _module_file(".".join(parts[:i]))
                if f is not None:
                    found.add(f)
    return found


def _only_docstring(path: Path) -> bool:
    body = ast.parse(path.read_text()).body
    return not body or (len(body) == 1 and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant))


def import_closure(path: Path) -> set[str]:
    """Repository-relative paths of every pipeline/ file (and data folder) that running
    the module at `path` may load, package __init__ files left out when they hold no code."""
    todo, seen = [path], set()
    while todo:
        f = todo.pop()
        if f in seen:
            continue
        seen.add(f)
        todo.extend(_imports(f) - seen)
    files = set()
    for f in seen - {path}:
        rel = f.relative_to(REPO).as_posix()
        if f.name == "__init__.py" and _only_docstring(f):
            continue
        files.add(rel)
        files.update(DATA_DEPS.get(rel, []))
    return files


def _stages() -> dict:
    """Stage name -> its definition (a foreach/matrix stage's `do` body)."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    return {name: st.get("do", st) for name, st in stages.items()}


def _stage_module(name: str, stage: dict) -> Path:
    cmd = stage["cmd"]
    module = cmd.split("python -m ", 1)[1].split()[0]
    return REPO / (module.replace(".", "/") + ".py")


STAGES = sorted(_stages())


@pytest.mark.parametrize("name", STAGES)
def test_stage_deps_follow_its_imports(name):
    stage = _stages()[name]
    module = _stage_module(name, stage)
    deps = {d for d in stage.get("deps", []) if isinstance(d, str)}
    code_deps = {d for d in deps if d == "pipeline" or d.startswith("pipeline/")}
    needed = import_closure(module)
    assert module.relative_to(REPO).as_posix() in deps, f"{name}: its own module is not a dependency"
    missing = sorted(needed - code_deps)
    extra = sorted(code_deps - needed)
    assert not missing, f"dvc.yaml stage {name} misses what {module.name} imports: {missing}"
    assert not extra, f"dvc.yaml stage {name} lists code its module never imports: {extra}"


def test_closure_walks_nested_and_lazy_imports():
    """The walker itself: a lazy import inside a function and a chain through a second
    module are both found (gradients imports corpus and selection inside functions)."""
    closure = import_closure(REPO / "stages" / "gradients.py")
    assert "pipeline/qdg/gradients.py" in closure
    assert "pipeline/core/config.py" in closure  # through stages.gradients and pipeline.qdg.gradients
    assert "pipeline/lm/corpus.py" in closure  # a lazy import in pipeline.qdg.gradients
    assert "pipeline/report/page.py" not in closure
    assert "pipeline/report/assets" in import_closure(REPO / "stages" / "report.py")


def test_sharded_stages_list_exactly_the_params_that_change_their_numbers():
    """losses and gradients list every key of their section but the execution ones, so an edit
    of a progress bar, a worker count or the memory bound reruns nothing (the parts' identity
    leaves the same keys out)."""
    import dataclasses

    from pipeline.core.config import GradientsConfig, LossesConfig
    from pipeline.lm.losses import EXECUTION_KEYS as LOSSES_EXECUTION
    from pipeline.qdg.gradients import EXECUTION_KEYS as GRADIENTS_EXECUTION

    stages = _stages()
    for name, cls, execution_keys, extra in (("losses", LossesConfig, LOSSES_EXECUTION, ()),
                                              ("gradients", GradientsConfig, GRADIENTS_EXECUTION, ("model", "revision"))):
        listed = {p.split(".", 1)[1] for p in stages[name]["params"] if p.startswith(f"{name}.")}
        numeric = {f.name for f in dataclasses.fields(cls) if f.name not in execution_keys} | set(extra)
        assert listed == numeric, f"{name}: dvc.yaml lists {sorted(listed)}, the numbers depend on {sorted(numeric)}"
        assert name not in stages[name]["params"]  # not the whole section
