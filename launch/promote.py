"""Move the registry alias `champion` to `candidate` when the candidate is better.

python launch/promote.py --config configs/small.yaml
"""

from pipeline.cli import run
from pipeline.track.tracking import promote


def main(cfg) -> None:
    r = promote(cfg)
    cand = f"v{r['candidate'][0]} ({r['metric']} {r['candidate'][1]:.4f})"
    champ = "none" if r["champion"] is None else f"v{r['champion'][0]} ({r['champion'][1]:.4f})"
    verdict = "promoted to champion" if r["promoted"] else "kept as candidate"
    print(f"{r['model']}: candidate {cand} vs champion {champ}: {verdict}")


if __name__ == "__main__":
    run(__doc__.strip().splitlines()[0], main)
