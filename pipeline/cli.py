"""The command lines of the entry points in launch/: ``--config FILE key=value ...`` for the
jobs, and the same handling of user errors for every entry point."""

from __future__ import annotations

import argparse
import errno
import sys
from collections.abc import Callable
from typing import TypeVar

from pipeline.config import Config, load_config
from pipeline.errors import UserError

T = TypeVar("T")


# what the file system refused, said for the person who can fix it (no traceback): the path,
# the reason and what to do; other OSErrors are bugs and keep their traceback
FILE_SYSTEM = {
    errno.EACCES: "permission denied: give this user access there or choose another path",
    errno.EPERM: "operation not permitted: give this user access there or choose another path",
    errno.EROFS: "read-only file system: choose a writable path",
    errno.ENOSPC: "no space left on the device: free space there or choose a path on a larger "
    "disk (nothing half-written is taken for a result)",
    errno.EDQUOT: "disk quota exceeded: free space there or choose another path (nothing "
    "half-written is taken for a result)",
    errno.ELOOP: "a loop of symbolic links: remove the link or point it at a real folder",
}


def file_system_error(exc: OSError) -> str | None:
    """One line for an OSError the user can fix, else None."""
    advice = FILE_SYSTEM.get(exc.errno)
    if advice is None:
        return None
    return f"{exc.filename or 'a file'}: {advice}"


def reporting_user_errors(call: Callable[[], T]) -> T:
    """``call()``; a user error, or a file system refusal, is printed without a traceback and
    exits with status 2."""
    try:
        return call()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except OSError as exc:
        line = file_system_error(exc)
        if line is None:
            raise
        print(f"error: {line}", file=sys.stderr)
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
