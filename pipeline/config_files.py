"""Reading configs: safe YAML (no implicit timestamps, a cap on alias expansion, errors with
the file, line and column) and ``section.key=value`` overrides; pipeline/config.py types and
validates what they give."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import ConfigError


class _Loader(yaml.SafeLoader):
    """YAML's safe loader without its implicit timestamps: ``start: 2024-01-01`` stays the
    string the source parses with its own format, not a ``datetime.date``."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
MAX_YAML_NODES = 100_000  # values in a config after aliases are expanded (an alias bomb stops)


def read_yaml(text: str, where: str) -> Any:
    """Parse config YAML; errors name ``where``, the line and column; aliases that expand to
    more than ``MAX_YAML_NODES`` values are refused before anything walks them."""
    try:
        value = yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        tab = " (YAML indents with spaces, not tabs)" if "\t" in text else ""
        where_at = f"{where}:{mark.line + 1}:{mark.column + 1}" if mark else where
        raise ConfigError(f"{where_at}: {exc.problem or exc.context}{tab}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: not valid YAML ({exc})") from None
    stack, count = [value], 0
    while stack:  # counts shared (aliased) values once per reference, as a walk would see them
        node = stack.pop()
        count += 1
        if count > MAX_YAML_NODES:
            raise ConfigError(
                f"{where}: more than {MAX_YAML_NODES} values once its aliases (*name) are "
                "expanded; write the values out or use fewer aliases"
            )
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return value


def read_yaml_file(path: Path) -> Any:
    """:func:`read_yaml` of a file, which must be UTF-8 (an error names the line otherwise)."""
    if path.is_dir():
        raise ConfigError(f"config file {path} is a directory: give the YAML file inside it")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ConfigError(
            f"{path}:{line}: byte 0x{data[exc.start]:02x} is not UTF-8; save the file as UTF-8"
        ) from None
    return read_yaml(text, str(path))


def apply_override(raw: dict[str, Any], override: str) -> None:
    """Apply one ``section.key=value`` override to the raw dict (value parsed as YAML)."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} must look like section.key=value")
    key, text = override.split("=", 1)
    parts = key.strip().split(".")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key!r}: {part!r} is a value, not a section")
        node = child
    try:
        node[parts[-1]] = read_yaml(text, f"override {key}") if text.strip() else None
    except ConfigError as exc:
        raise ConfigError(f"{exc}; quote a plain string value ({key}='\"{text}\"')") from None
