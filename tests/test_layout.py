"""The package reads as the data flow: imports run downward, and each heavy dependency has one
owner module (docs/design.md, section 5)."""

import ast
from pathlib import Path

import pytest

PIPELINE = Path(__file__).resolve().parents[1] / "pipeline"
STAGES = ["data", "model", "evaluate", "train", "track"]  # a stage imports only earlier ones
OWNERS = {
    "deepspeed": "train/engine.py",
    "mlflow": "track/tracking.py",
    "ray": "track/tune.py",
    "dask": "data/preprocess.py",
}


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


MODULES = sorted(PIPELINE.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PIPELINE)))
def test_imports_run_downward(path):
    rel = path.relative_to(PIPELINE)
    stage = rel.parts[0] if len(rel.parts) > 1 else None
    allowed = STAGES[: STAGES.index(stage) + 1] if stage else []
    for name in _imports(path):
        parts = name.split(".")
        if parts[0] == "pipeline" and len(parts) > 1 and parts[1] in STAGES:
            assert parts[1] in allowed, f"{rel} imports {name}: {stage or 'top'} is below it"
        if parts[0] in OWNERS:
            assert rel.as_posix() == OWNERS[parts[0]], f"{rel} imports {parts[0]}"
