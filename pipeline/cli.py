"""The command lines of the entry points in launch/: ``--config FILE key=value ...`` for the
jobs, and the same handling of user errors for every entry point."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import TypeVar

from pipeline.config import Config, load_config
from pipeline.errors import UserError

T = TypeVar("T")


def reporting_user_errors(call: Callable[[], T]) -> T:
    """``call()``; a user error is printed without a traceback and exits with status 2."""
    try:
        return call()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


def run(description: str, job: Callable[[Config], object]) -> None:
    """Parse ``--config`` and overrides, run ``job(config)``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", help="YAML config (default: the embedded defaults)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    args = parser.parse_args()
    reporting_user_errors(lambda: job(load_config(args.config, args.overrides)))
