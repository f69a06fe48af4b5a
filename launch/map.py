"""Forecast map: an exported or registered model's forecast on a regular grid over a store's
network, written as NetCDF (xarray) and PNG (sensors drawn on it).

python launch/map.py --model runs/small/model --store stores/small.zarr
python launch/map.py --model models:/sit-small@candidate --tracking-uri sqlite:///mlruns.db \
    --store stores/small.zarr --origin 2024-01-05T12:00 --grid 100 --out maps/
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from pipeline.cli import reporting_user_errors
from pipeline.errors import UserError


def exported_model(model: str, tracking_uri: str | None, tmp: str) -> Path:
    """The exported model's folder: ``model`` itself, or a registered model's files fetched
    and checked against their recorded checksums."""
    if not model.startswith(("models:/", "runs:/")):
        path = Path(model)
        if not (path / "model.json").is_file():
            raise UserError(
                f"{path} is not an exported model (no model.json): give runs/NAME/model"
            )
        return path
    if tracking_uri:  # MLflow reads it (pipeline/track/tracking.py owns the mlflow import)
        os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
    from pipeline.track.tracking import fetch_verified

    local = fetch_verified(model, tmp)
    (found,) = local.rglob("model.json")
    return found.parent


def origin_index(store, when: str | None, time_in: int) -> int:
    """The time index of ``when`` (ISO time, UTC), else the first origin of the test split."""
    if when is None:
        return store.split("test")[0] + time_in
    try:
        stamp = np.datetime64(when.rstrip("Z"), "ns").astype(np.int64)
    except ValueError:
        raise UserError(f"--origin {when!r} is not a time: give e.g. 2024-01-05T12:00") from None
    times = store["time"][:]
    i = int(np.searchsorted(times, stamp))
    if i >= len(times) or times[i] != stamp:
        raise UserError(f"--origin {when} is not a time step of {store.path}")
    return i


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--model", required=True, help="exported model folder or models:/ URI")
    parser.add_argument("--store", required=True, help="the Zarr store whose window to use")
    parser.add_argument("--origin", help="first forecast time (UTC); default: test split start")
    parser.add_argument("--grid", type=int, default=100, help="cells per side")
    parser.add_argument("--step", type=int, default=1, help="horizon step drawn in the PNG")
    parser.add_argument("--out", default="maps", help="output folder")
    parser.add_argument("--tracking-uri", help="for a models:/ URI (default: MLflow's)")
    args = parser.parse_args()

    def run() -> None:
        from pipeline.data.store import open_store
        from pipeline.evaluate.maps import forecast_grid, map_figure
        from pipeline.model.export import Predictor

        store = open_store(args.store)
        with tempfile.TemporaryDirectory() as tmp:
            predictor = Predictor(exported_model(args.model, args.tracking_uri, tmp))
        origin = origin_index(store, args.origin, predictor.meta["time_in"])
        start = time.perf_counter()
        ds = forecast_grid(predictor, store, origin, args.grid)
        seconds = time.perf_counter() - start
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        stem = f"map-{str(ds['time'].values[0])[:16].replace(':', '')}"
        ds.to_netcdf(out / f"{stem}.nc.tmp", engine="h5netcdf")
        (out / f"{stem}.nc.tmp").replace(out / f"{stem}.nc")
        map_figure(ds, store, args.step).savefig(out / f"{stem}.png", dpi=120)
        print(f"{args.grid} x {args.grid} grid in {seconds:.2f} s: {out / stem}.nc, .png")

    reporting_user_errors(run)
    sys.exit(0)


if __name__ == "__main__":
    main()
