"""Checksums of a model's artifact files, recorded in the tracking store at registration and
checked before the model is loaded (the artifact store is often another system than the
tracking store: a file changed there is found before any of it runs)."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.data.sources.base import sha256
from pipeline.errors import UserError

TAG = "artifact_sha256"  # run and model-version tag: {relative path: sha256} as JSON


class ArtifactChanged(UserError, RuntimeError):
    """A model's files differ from those recorded when it was logged."""


def digest(root: Path) -> dict[str, str]:
    """{path relative to ``root``: sha256} of every file below ``root``."""
    root = Path(root)
    files = sorted(p for p in root.rglob("*") if p.is_file() or p.is_symlink())
    return {p.relative_to(root).as_posix(): sha256(p) for p in files}


def encode(sums: dict[str, str]) -> str:
    return json.dumps(sums, sort_keys=True, separators=(",", ":"))


def verify(root: Path, recorded: str | None, what: str) -> None:
    """Raise :class:`ArtifactChanged`, naming the first difference, unless the files below
    ``root`` are exactly those of ``recorded`` (the tag's JSON) with their checksums."""
    if not recorded:
        raise ArtifactChanged(
            f"{what} has no checksums recorded in the tracking store (tag {TAG}; logged before "
            "they were, or not by this pipeline): train and register it again"
        )
    expected = json.loads(recorded)
    found = digest(root)
    for name in sorted(expected.keys() | found.keys()):
        if name not in found:
            problem = "is missing"
        elif name not in expected:
            problem = "was added"
        elif found[name] != expected[name]:
            problem = "was changed"
        else:
            continue
        raise ArtifactChanged(
            f"{what}: artifact file {name} {problem} since it was logged (checksums recorded in "
            "the tracking store): it is refused unloaded; register a model you trained again"
        )
