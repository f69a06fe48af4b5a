"""Preprocessing and the store contract on a real Dask cluster: atomic publish, refusal of
unfinished, other-version and damaged stores, nothing half-written left behind."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from cases import IDS, ROOT, expect_error, hourly_rows, run, write_case

from pipeline.data.store import MARKER, StoreError, open_store


def test_good_input_makes_a_valid_store(scheduler, tmp_path):
    path = run(scheduler, write_case(tmp_path))
    store = open_store(path)
    assert store.shape == (60, 4, 1)
    assert sorted(store["sensor_id"][:].tolist()) == sorted(IDS)
    assert store["mask"][:].all()


def test_sensor_without_any_observation(scheduler, tmp_path):
    rows = [[r[0], r[1], "", r[3], r[4]] for r in hourly_rows()]
    expect_error(scheduler, tmp_path, write_case(tmp_path, rows), "no observation", "b2")


def test_sentinels_are_masked_not_used(scheduler, tmp_path):
    rows = hourly_rows()
    rows[3][1] = "0"
    store = open_store(run(scheduler, write_case(tmp_path, rows) + ["data.source.sentinels=[0]"]))
    a1 = list(store["sensor_id"][:]).index("a1")
    assert not store["mask"][3, a1, 0] and np.isnan(store["values"][3, a1, 0])
    assert store["mean"][a1, 0] == pytest.approx(1.0)


@pytest.mark.parametrize("cell", ["1e15", "-1e15", "3e20"])
def test_a_value_of_1e15_or_more_is_refused_naming_the_sensor(scheduler, tmp_path, cell):
    rows = hourly_rows()
    rows[7][2] = cell  # sensor b2 (float32 holds 1e15 as 9.99999987e14: still refused)
    expect_error(scheduler, tmp_path, write_case(tmp_path, rows), "'b2'", "or more are taken")


def test_all_sensors_at_one_point_are_refused(scheduler, tmp_path):
    locations = [(s, 34.0, -118.0) for s in IDS]
    overrides = write_case(tmp_path, locations=locations)
    expect_error(scheduler, tmp_path, overrides, "loc.csv", "all 4 sensors are at one point")


def test_a_compressed_csv_is_named_as_such_not_as_an_encoding_problem(scheduler, tmp_path):
    import gzip

    overrides = write_case(tmp_path)
    path = Path(next(o.split("=", 1)[1] for o in overrides if o.startswith("data.source.path=")))
    path.write_bytes(gzip.compress(path.read_bytes()))
    expect_error(scheduler, tmp_path, overrides, str(path), "is gzip-compressed")


def test_unknown_source_kind(scheduler, tmp_path):
    ov = write_case(tmp_path) + ["data.source.kind=netcdf4"]
    msg = expect_error(scheduler, tmp_path, ov, "data.source.kind", "'netcdf4'")
    assert "wide_csv" in msg


def test_existing_store_needs_overwrite(scheduler, tmp_path):
    ov = write_case(tmp_path)
    run(scheduler, ov)
    before = open_store(tmp_path / "out.zarr").fingerprint()
    with pytest.raises(StoreError, match="already exists.*data.overwrite=true"):
        run(scheduler, ov)
    assert open_store(tmp_path / "out.zarr").fingerprint() == before
    run(scheduler, ov + ["data.overwrite=true"])
    open_store(tmp_path / "out.zarr")


def test_two_preprocesses_to_one_target_do_not_both_publish(scheduler, tmp_path):
    """A second preprocess that passed the existence check publishes while the first is still
    writing: the first is refused at its own publish and leaves the second's store as is."""
    import shutil

    from pipeline.data.store import atomic_store

    ov = write_case(tmp_path)
    target = tmp_path / "out.zarr"
    refused = pytest.raises(StoreError, match="published by another process")
    with refused, atomic_store(target) as tmp:  # the first: past its check, still writing
        run(scheduler, ov)  # the second publishes meanwhile
        published = open_store(target).fingerprint()
        shutil.copytree(target, tmp, ignore=shutil.ignore_patterns(MARKER))
    assert open_store(target).fingerprint() == published
    assert not list(tmp_path.glob(".out.zarr.partial-*"))


def test_unfinished_and_other_version_stores_are_refused(scheduler, tmp_path):
    path = run(scheduler, write_case(tmp_path))
    (path / MARKER).unlink()
    with pytest.raises(StoreError, match="unfinished"):
        open_store(path)
    with pytest.raises(StoreError, match="does not exist"):
        open_store(tmp_path / "nope.zarr")


@pytest.mark.parametrize("damage", ["deleted", "truncated", "altered"])
def test_a_damaged_store_is_refused_naming_the_chunk(scheduler, tmp_path, damage):
    """A missing or truncated chunk file stops open_store (Zarr would read it as NaN); an
    altered one of the same size is found by the checksum check (--verify)."""
    from pipeline.data.store import verify_store

    path = run(scheduler, write_case(tmp_path))
    assert verify_store(path) > 0
    chunk = sorted((path / "values" / "c").rglob("*"))
    chunk = [c for c in chunk if c.is_file()][0]
    name = chunk.relative_to(path).as_posix()
    data = chunk.read_bytes()
    if damage == "deleted":
        chunk.unlink()
    elif damage == "truncated":
        chunk.write_bytes(data[: len(data) // 2])
    else:
        chunk.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    if damage == "altered":
        open_store(path)  # same size: the cheap check passes
        with pytest.raises(StoreError, match=f"{name} does not match its checksum"):
            verify_store(path)
    else:
        with pytest.raises(StoreError, match=name):
            open_store(path)
    proc = subprocess.run(
        [sys.executable, "launch/preprocess.py", "--verify", str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and name in proc.stderr and "Traceback" not in proc.stderr


def test_killed_mid_write_leaves_no_finished_store(tmp_path):
    target = tmp_path / "big.zarr"
    cmd = [
        sys.executable,
        str(ROOT / "launch" / "preprocess.py"),
        f"data.store={target}",
        "data.synthetic.num_sensors=20000",
        "data.synthetic.num_steps=3000",
        "data.node_chunk=2048",
        "dask.workers=1",
    ]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.time() + 120
    while time.time() < deadline:  # wait until chunks are being written
        partials = list(tmp_path.glob(".big.zarr.partial-*/values/c"))
        if partials:
            break
        time.sleep(0.2)
    assert partials, "preprocessing never started writing"
    time.sleep(1.0)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (target / MARKER).exists()
    with pytest.raises(StoreError):
        open_store(target)
    small = [
        *cmd[:2],
        f"data.store={target}",
        "data.synthetic.num_sensors=300",
        "data.synthetic.num_steps=200",
        "dask.workers=1",
    ]
    subprocess.run(small, cwd=ROOT, check=True, capture_output=True, timeout=300)
    assert open_store(target).shape == (200, 300, 1)
    assert not list(tmp_path.glob(".big.zarr.partial-*")), "stale partial store not cleaned"


def test_synthetic_outages_reach_the_store_as_its_mask(scheduler, tmp_path):
    """A clustered field with outages: the store's mask is the field's ``observed`` (sensors in
    the store's curve order), the values are NaN exactly where it is False, and the store
    records the regime in its synthetic configuration."""
    from pipeline.config import SyntheticConfig
    from pipeline.data.synthetic import SyntheticField

    extra = {"layout": "clustered", "outage_fraction": 0.4, "outage_steps": 20}
    path = run(
        scheduler,
        [
            f"data.store={tmp_path / 'outages.zarr'}",
            "data.synthetic.num_sensors=200",
            "data.synthetic.num_steps=120",
            "data.time_in=6",
            "data.horizon=3",
            *(f"data.synthetic.{k}={v}" for k, v in extra.items()),
        ],
    )
    store = open_store(path)
    cfg = SyntheticConfig(**store.attrs["synthetic"])
    assert {k: getattr(cfg, k) for k in extra} == extra
    index = np.array([int(s[1:]) for s in store["sensor_id"][:]])  # "s017" -> 17
    expected = SyntheticField(cfg).observed(0, 120, index)  # [T, N] in store order
    mask = store["mask"][:, :, 0]
    np.testing.assert_array_equal(mask, expected)
    assert 0 < (~mask).mean() < 0.5
    np.testing.assert_array_equal(np.isnan(store["values"][:, :, 0]), ~expected)
    np.testing.assert_allclose(store["coords"][:], SyntheticField(cfg).coords(index))


def test_a_skipped_spring_forward_hour_is_said_not_silently_missing(scheduler, tmp_path, capsys):
    """Local times written without an offset skip 02:00 on 2024-03-31 (Europe): read as UTC,
    that hour is missing at every sensor; the run says why it may be."""
    stamps = pd.date_range("2024-03-30 00:00", periods=72, freq="1h")
    stamps = stamps[stamps != pd.Timestamp("2024-03-31 02:00")]
    rows = [[str(s), "1.0", "2.0", "3.0", "4.0"] for s in stamps]
    run(scheduler, write_case(tmp_path, rows))
    out = capsys.readouterr().out
    assert "no row for the hour from 2024-03-31 02:00 UTC, a Sunday" in out, out
    # an ordinary missing hour on a weekday is no such case
    stamps = pd.date_range("2024-03-25 00:00", periods=72, freq="1h")
    rows = [[str(s), "1.0", "2.0", "3.0", "4.0"] for s in stamps if s.hour != 5 or s.day != 26]
    (tmp_path / "weekday").mkdir()
    run(scheduler, write_case(tmp_path / "weekday", rows))
    assert "no row for the hour" not in capsys.readouterr().out
