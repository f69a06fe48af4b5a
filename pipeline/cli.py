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


def parse_command_line(description: str, default_config: str | None = None) -> argparse.Namespace:
    """``--config FILE`` (default: ``default_config``, else the embedded defaults) and
    ``section.key=value`` overrides."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default=default_config, help="YAML config")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    # the DeepSpeed launcher passes --local_rank=N; LOCAL_RANK in the environment says the same
    return parser.parse_args([a for a in sys.argv[1:] if not a.startswith("--local_rank")])


def run(description: str, job: Callable[[Config], object]) -> None:
    """Parse ``--config`` and overrides, run ``job(config)``."""
    args = parse_command_line(description)
    reporting_user_errors(lambda: job(load_config(args.config, args.overrides)))
