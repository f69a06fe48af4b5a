"""The command line shared by every entry point in launch/: ``--config FILE key=value ...``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from pipeline.config import Config, load_config
from pipeline.errors import UserError


def run(description: str, job: Callable[[Config], object]) -> None:
    """Parse ``--config`` and overrides, run ``job(config)``; user errors exit 2 with a message."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", help="YAML config (default: the embedded defaults)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    args = parser.parse_args()
    try:
        job(load_config(args.config, args.overrides))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
