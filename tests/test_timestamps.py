"""Timestamps are never silently misread: day-first dates read with the format keys and
refused when ambiguous or spread thin; calendar frequencies make a calendar axis; a file
without a time column takes its axis from data.source.start."""

import numpy as np
import pandas as pd
import pytest
from cases import IDS, expect_error, run, write_case

from pipeline.data.store import open_store


def _dayfirst_rows(fmt="%d/%m/%Y %H:%M", start="2024-01-30"):
    """60 hourly rows written day first (31/01/2024 ...)."""
    t = pd.date_range(start, periods=60, freq="1h")
    return [[s.strftime(fmt), "1", "2", "3", "4"] for s in t], t


@pytest.mark.parametrize("how", ["dayfirst", "time_format"])
def test_day_first_timestamps_read_with_the_format_keys(scheduler, tmp_path, how):
    rows, t = _dayfirst_rows()
    ov = write_case(tmp_path, rows)
    extra = {
        "dayfirst": ["data.source.dayfirst=true"],
        "time_format": ["data.source.time_format='%d/%m/%Y %H:%M'"],
    }[how]
    store = open_store(run(scheduler, ov + extra))
    stamps = pd.to_datetime(store["time"][:], utc=True)
    assert stamps[0] == pd.Timestamp("2024-01-30", tz="UTC") and len(stamps) == 60
    assert store["mask"][:].all()


@pytest.mark.parametrize("start", ["2024-02-01", "2024-02-12"])
def test_day_first_timestamps_are_never_silently_misread(scheduler, tmp_path, start):
    """Read month first, 01/02/2024 is 2 January and 02/02/2024 2 February: the rows spread
    over months (or, from 12/02, meet a 13th month). Either way an error that suggests the
    keys, never a store of a sparse, wrong axis."""
    rows, _ = _dayfirst_rows(start=start)
    expect_error(scheduler, tmp_path, write_case(tmp_path, rows), "dayfirst", "time_format")


def test_long_day_first_timestamps_spread_thin_are_refused(scheduler, tmp_path):
    t = pd.date_range("2024-01-01", periods=48, freq="1h")  # 2 days, hourly
    frame = pd.DataFrame(
        [(s, ts.strftime("%d/%m/%Y %H:%M"), 1.0, 2.0) for ts in t for s in IDS],
        columns=["sensor_id", "time", "value", "flow"],
    )
    # 01/01 and 02/01 read month first: 1 January and 2 February, a month apart
    path = tmp_path / "long.csv"
    frame.to_csv(path, index=False)
    ov = [o for o in write_case(tmp_path) if "time_column" not in o and "source.path" not in o]
    ov += ["data.source.kind=long_csv", f"data.source.path={path}", "data.source.freq=1h"]
    err = expect_error(scheduler, tmp_path, ov, "fill only", "dayfirst")
    assert "%" in err  # the example format
    store = open_store(run(scheduler, ov + ["data.source.dayfirst=true"]))
    assert store.shape[0] == 48


@pytest.mark.parametrize("freq, given", [("YS", True), ("MS", True), ("W", True), ("YS", False)])
def test_calendar_frequencies_make_a_calendar_axis(scheduler, tmp_path, freq, given):
    """Years and months vary in length: their axis is the calendar's, given or inferred."""
    t = pd.date_range("1950-01-01", periods=60, freq=freq)
    rows = [[str(s), "1", "2", "3", "4"] for s in t]
    del rows[7]  # a gap: a masked step on the calendar grid
    extra = [f"data.source.freq={freq}"] if given else []
    store = open_store(run(scheduler, write_case(tmp_path, rows) + extra))
    np.testing.assert_array_equal(store["time"][:], t.as_unit("ns").asi8)
    assert not store["mask"][7].any() and store["mask"][8].all()


def test_long_monthly_data_lands_on_its_months(scheduler, tmp_path):
    t = pd.date_range("2000-01-01", periods=40, freq="MS")
    frame = pd.DataFrame([(s, ts, float(i)) for i, ts in enumerate(t) for s in IDS])
    frame.columns = ["sensor_id", "time", "value"]
    frame.to_csv(tmp_path / "long.csv", index=False)
    ov = [o for o in write_case(tmp_path) if "time_column" not in o and "source.path" not in o]
    ov += ["data.source.kind=long_csv", f"data.source.path={tmp_path / 'long.csv'}"]
    store = open_store(run(scheduler, ov))
    np.testing.assert_array_equal(store["time"][:], t.as_unit("ns").asi8)
    np.testing.assert_array_equal(store["values"][:, 0, 0], np.arange(40, dtype=np.float32))


def test_start_date_from_yaml_reads_a_file_without_time_column(scheduler, tmp_path):
    ov = [o for o in write_case(tmp_path) if "time_column" not in o]
    data = tmp_path / "data.csv"
    data.write_text("\n".join(line.split(",", 1)[1] for line in data.read_text().splitlines()))
    (tmp_path / "cfg.yaml").write_text("data:\n  source:\n    start: 2024-01-01\n    freq: h\n")
    from pipeline.config import load_config
    from pipeline.data.preprocess import preprocess

    cfg = load_config(tmp_path / "cfg.yaml", [f"dask.scheduler={scheduler}", *ov])
    store = open_store(preprocess(cfg, progress=False))
    assert store["time"][0] == pd.Timestamp("2024-01-01", tz="UTC").value
