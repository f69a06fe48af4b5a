"""Serve a registered model over HTTP (MLflow's scoring server), its files checked first.

python launch/serve.py --config configs/small.yaml [tracking.serve_alias=candidate]
curl -s http://127.0.0.1:5001/invocations -H 'Content-Type: application/json' \
     -d '{"inputs": {"x": [...], "origin_time": [...]}}'
"""

import sys

from pipeline.cli import run


def main(cfg) -> None:
    from pipeline.track.tracking import serve

    sys.exit(serve(cfg))


if __name__ == "__main__":
    run(__doc__.strip().splitlines()[0], main)
