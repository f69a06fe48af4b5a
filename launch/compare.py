"""Diebold-Mariano test of one finished run against another on their common test windows.

python launch/compare.py runs/small runs/small-none [--json out.json]
"""

import argparse
import json
from pathlib import Path

from pipeline.cli import reporting_user_errors
from pipeline.evaluate.compare import compare_runs, format_comparison

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("run_a", help="run directory (<train.out_dir>/<name>) of the model")
    parser.add_argument("run_b", help="run directory of the baseline it is tested against")
    parser.add_argument("--json", help="also write the result to this JSON file")
    args = parser.parse_args()
    result = reporting_user_errors(lambda: compare_runs(args.run_a, args.run_b))
    print(format_comparison(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
