"""The cluster recipes: YAML parses, every repository path and entry point they name exists,
shell scripts pass `bash -n`."""

import re
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
INFRA = sorted(p for p in (ROOT / "infra").rglob("*") if p.is_file())
PATHS = re.compile(r"(?<![\w/.~-])((?:launch|configs|infra|pipeline|benchmarks)/[\w./-]+)")


def test_infra_has_every_recipe():
    names = {p.relative_to(ROOT).as_posix() for p in INFRA}
    for needed in (
        "infra/README.md",
        "infra/ray/cluster.yaml",
        "infra/dask/kubernetes.yaml",
        "infra/dask/slurm_cluster.py",
        "infra/deepspeed/hostfile",
        "infra/deepspeed/train.sbatch",
        "infra/mlflow/compose.yaml",
        "infra/docker/Dockerfile",
    ):
        assert needed in names


@pytest.mark.parametrize(
    "path", [p for p in INFRA if p.suffix in (".yaml", ".yml")], ids=lambda p: p.name
)
def test_yaml_parses(path):
    docs = list(yaml.safe_load_all(path.read_text()))
    assert docs and all(d is not None for d in docs)


@pytest.mark.parametrize("path", [*INFRA, ROOT / "README.md"], ids=lambda p: p.name)
def test_named_paths_exist(path):
    text = path.read_text()
    for name in PATHS.findall(text):
        name = name.rstrip(".")
        assert (ROOT / name).exists(), f"{path.name} names {name}, which is not in the repository"


@pytest.mark.parametrize(
    "path",
    [p for p in INFRA if p.suffix in (".sh", ".sbatch")] + [ROOT / ".ci" / "run"],
    ids=lambda p: p.name,
)
def test_shell_scripts_parse(path):
    subprocess.run(["bash", "-n", str(path)], check=True)


def test_python_recipes_compile():
    for path in (p for p in INFRA if p.suffix == ".py"):
        compile(path.read_text(), str(path), "exec")


def test_mlflow_server_binds_to_loopback_by_default():
    compose = yaml.safe_load((ROOT / "infra" / "mlflow" / "compose.yaml").read_text())
    assert compose["services"]["mlflow"]["ports"] == ["${MLFLOW_BIND:-127.0.0.1}:5000:5000"]
