"""Diebold-Mariano test of one finished run against another on their common test windows.

python launch/compare.py runs/small runs/small-none [--json out.json]
python launch/compare.py --a runs/s0 runs/s1 runs/s2 --b runs/n0 runs/n1 runs/n2  # over seeds
"""

import argparse
import json
from pathlib import Path

from pipeline.cli import reporting_user_errors
from pipeline.evaluate.compare import compare_runs, format_comparison

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("run_a", nargs="?", help="run directory (<train.out_dir>/<name>)")
    parser.add_argument("run_b", nargs="?", help="run directory of what it is tested against")
    parser.add_argument("--a", nargs="+", help="runs of A (seeds): losses averaged over them")
    parser.add_argument("--b", nargs="+", help="runs of B (seeds)")
    parser.add_argument("--json", help="also write the result to this JSON file")
    args = parser.parse_args()
    a, b = args.a or args.run_a, args.b or args.run_b
    if not a or not b:
        parser.error("give two run directories, or --a RUN... --b RUN...")
    result = reporting_user_errors(lambda: compare_runs(a, b))
    print(format_comparison(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
