"""Raw sources read by preprocessing on a real Dask cluster: every format and dialect keeps
each value with its sensor and time; bad input is a clear error naming file, line and sensor,
and leaves nothing behind."""

import shutil

import numpy as np
import pandas as pd
import pytest
from cases import IDS, expect_error, hourly_rows, run, write_case

from pipeline.data.store import open_store


def _stored(path) -> pd.DataFrame:
    """A store's values as a [time, sensor id] frame (sensors back in id order)."""
    store = open_store(path)
    values = store["values"][:, :, 0]
    return pd.DataFrame(values, columns=store["sensor_id"][:].tolist())[IDS]


@pytest.mark.parametrize(
    "dialect",
    ["bom-quoted-crlf", "semicolon-decimal-comma", "latin1"],
)
def test_spreadsheet_exports_read_the_same_values(scheduler, tmp_path, dialect):
    """What spreadsheets and loggers write reads to the same store as a plain CSV."""
    good = tmp_path / "plain"
    good.mkdir()
    want = _stored(run(scheduler, write_case(good)))
    overrides = write_case(tmp_path)
    data = tmp_path / "data.csv"
    lines = data.read_text().splitlines()
    rows = [line.split(",") for line in lines]
    if dialect == "bom-quoted-crlf":
        text = "\ufeff" + "\r\n".join(",".join(f'"{c}"' for c in r) for r in rows) + "\r\n"
        data.write_bytes(text.encode("utf-8"))
        extra = []
    elif dialect == "semicolon-decimal-comma":
        text = "\n".join(";".join(c.replace(".", ",") for c in r) for r in rows) + "\n"
        data.write_text(text)
        extra = ["data.source.delimiter=;", 'data.source.decimal=","']
    else:  # a latin-1 header (an accented sensor id) needs the encoding set
        rows[0][1] = "a1\u00e9"
        data.write_bytes(("\n".join(",".join(r) for r in rows) + "\n").encode("latin-1"))
        loc = tmp_path / "loc.csv"
        loc.write_text(loc.read_text().replace("a1,", "a1\u00e9,"))
        extra = ["data.source.encoding=latin-1"]
    store = open_store(run(scheduler, overrides + extra))
    got = pd.DataFrame(store["values"][:, :, 0], columns=store["sensor_id"][:].tolist())
    got = got.rename(columns={"a1\u00e9": "a1"})[IDS]
    np.testing.assert_array_equal(got.to_numpy(), want.to_numpy())


def test_wrong_delimiter_is_named(scheduler, tmp_path):
    overrides = write_case(tmp_path)
    data = tmp_path / "data.csv"
    data.write_text(data.read_text().replace(",", ";"))
    expect_error(scheduler, tmp_path, overrides, "data.csv, line 1", "data.source.delimiter")


def test_bad_cell_with_decimal_comma_names_line_and_sensor(scheduler, tmp_path):
    rows = [[c.replace(".", ",") for c in r] for r in hourly_rows()]
    rows[7][3] = "12,5x"
    overrides = write_case(tmp_path)
    data = tmp_path / "data.csv"
    data.write_text("\n".join(";".join(r) for r in [["time", *IDS], *rows]) + "\n")
    extra = ["data.source.delimiter=;", 'data.source.decimal=","']
    expect_error(scheduler, tmp_path, overrides + extra, "line 9", "'c3'", "12,5x")


def test_empty_file(scheduler, tmp_path):
    ov = write_case(tmp_path)
    (tmp_path / "data.csv").write_text("")
    expect_error(scheduler, tmp_path, ov, "data.csv", "empty")


def test_header_only(scheduler, tmp_path):
    ov = write_case(tmp_path)
    (tmp_path / "data.csv").write_text("time,a1,b2,c3,d4\n")
    expect_error(scheduler, tmp_path, ov, "data.csv", "no data rows")


def test_non_numeric_cell(scheduler, tmp_path):
    rows = hourly_rows()
    rows[9][3] = "abc"
    expect_error(
        scheduler, tmp_path, write_case(tmp_path, rows), "data.csv", "line 11", "'c3'", "'abc'"
    )


@pytest.mark.parametrize("extra", [True, False], ids=["too-many", "too-few"])
def test_ragged_row(scheduler, tmp_path, extra):
    rows = hourly_rows()
    rows[20] = rows[20] + ["9"] if extra else rows[20][:-1]
    expect_error(scheduler, tmp_path, write_case(tmp_path, rows), "data.csv", "line 22", "ragged")


def test_duplicate_sensor_ids(scheduler, tmp_path):
    ov = write_case(tmp_path, header=["time", "a1", "b2", "a1", "d4"])
    expect_error(scheduler, tmp_path, ov, "data.csv", "duplicate sensor ids", "a1")


def test_duplicate_timestamps(scheduler, tmp_path):
    rows = hourly_rows()
    rows[5][0] = rows[4][0]
    expect_error(
        scheduler, tmp_path, write_case(tmp_path, rows), "duplicate timestamp", "lines 6 and 7"
    )


def test_non_monotonic_timestamps(scheduler, tmp_path):
    rows = hourly_rows()
    rows[7], rows[8] = rows[8], rows[7]
    expect_error(scheduler, tmp_path, write_case(tmp_path, rows), "line 10", "sort the rows")


def test_gaps_become_masked_rows(scheduler, tmp_path):
    rows = hourly_rows()
    del rows[10:13]
    store = open_store(run(scheduler, write_case(tmp_path, rows)))
    assert store.shape[0] == 60
    assert not store["mask"][10:13].any() and store["mask"][:10].all()
    assert np.isnan(store["values"][10:13]).all()


def test_sensor_without_location(scheduler, tmp_path):
    locs = [(s, 34.0 + 0.01 * i, -118.0) for i, s in enumerate(IDS[:3])]
    expect_error(
        scheduler, tmp_path, write_case(tmp_path, locations=locs), "loc.csv", "no location", "d4"
    )


def test_location_without_data(scheduler, tmp_path):
    locs = [(s, 34.0 + 0.01 * i, -118.0) for i, s in enumerate([*IDS, "zz"])]
    expect_error(
        scheduler, tmp_path, write_case(tmp_path, locations=locs), "loc.csv", "no data", "zz"
    )


@pytest.mark.parametrize("lat", ["91.5", "nan", ""])
def test_bad_latitude(scheduler, tmp_path, lat):
    locs = [(s, 34.0 + 0.01 * i, -118.0) for i, s in enumerate(IDS)]
    locs[2] = ("c3", lat, -118.0)
    expect_error(
        scheduler, tmp_path, write_case(tmp_path, locations=locs), "loc.csv", "line 4", "'c3'"
    )


def _long_frame():
    t = pd.date_range("2024-01-01", periods=30, freq="15min")
    rng = np.random.default_rng(0)
    rows = [(s, ts, rng.normal(), rng.normal()) for ts in t for s in IDS]
    return pd.DataFrame(rows, columns=["sensor_id", "time", "value", "flow"])


@pytest.mark.parametrize("kind", ["long_csv", "parquet"])
def test_long_formats_with_two_features(scheduler, tmp_path, kind):
    ov = write_case(tmp_path)
    frame = _long_frame().drop(index=[5, 17])  # two missing observations
    path = tmp_path / ("long.csv" if kind == "long_csv" else "long.parquet")
    frame.to_csv(path, index=False) if kind == "long_csv" else frame.to_parquet(path)
    ov = [o for o in ov if "time_column" not in o and "source.path" not in o]
    store = open_store(
        run(
            scheduler,
            ov
            + [
                f"data.source.kind={kind}",
                f"data.source.path={path}",
                "data.source.value_columns=[value, flow]",
            ],
        )
    )
    assert store.shape == (30, 4, 2) and store.attrs["freq"] == "15min"
    assert (~store["mask"][:]).sum() == 4  # 2 rows x 2 features
    ids = list(store["sensor_id"][:])
    row = _long_frame().iloc[6]
    np.testing.assert_allclose(
        store["values"][1, ids.index(row.sensor_id)], [row.value, row.flow], rtol=1e-6
    )


def test_long_duplicate_observation(scheduler, tmp_path):
    ov = [o for o in write_case(tmp_path) if "time_column" not in o and "source.path" not in o]
    frame = _long_frame()
    frame = pd.concat([frame, frame.iloc[[3]]])
    frame.to_csv(tmp_path / "long.csv", index=False)
    expect_error(
        scheduler,
        tmp_path,
        ov + ["data.source.kind=long_csv", f"data.source.path={tmp_path / 'long.csv'}"],
        "long.csv",
        "two rows",
        "'d4'",
    )


@pytest.mark.parametrize("kind", ["long_csv", "parquet"])
def test_long_files_stream_in_partitions(scheduler, tmp_path, kind):
    """Rows in any order, read in many small partitions (tiny data.source.partition_mb), give
    the store of one partition; a duplicate in another partition names both rows."""
    ov = [o for o in write_case(tmp_path) if "time_column" not in o and "source.path" not in o]
    frame = _long_frame().sample(frac=1.0, random_state=1).reset_index(drop=True)
    path = tmp_path / ("long.csv" if kind == "long_csv" else "long.parquet")

    def write(f):
        if kind == "long_csv":
            f.to_csv(path, index=False)
        else:
            f.to_parquet(path, row_group_size=7)

    write(frame)
    base = [
        f"data.source.kind={kind}",
        f"data.source.path={path}",
        "data.source.value_columns=[value, flow]",
    ]
    whole = open_store(run(scheduler, ov + base))
    want = whole["values"][:]
    shutil.rmtree(whole.path)
    parts = open_store(run(scheduler, ov + base + ["data.source.partition_mb=0.001"]))
    np.testing.assert_array_equal(parts["values"][:], want)
    shutil.rmtree(parts.path)
    assert not list(tmp_path.glob(".*spill*")), "the spill folder was left behind"
    write(pd.concat([frame, frame.iloc[[3]]], ignore_index=True))  # row 3 again, at the end
    offset, unit = (2, "lines") if kind == "long_csv" else (0, "rows")  # CSV: header, 1-based
    first, last = 3 + offset, len(frame) + offset
    expect_error(
        scheduler,
        tmp_path,
        ov + base + ["data.source.partition_mb=0.001"],
        "two rows",
        repr(frame.sensor_id[3]),
        f"{unit} {first} and {last}",
    )
    assert not list(tmp_path.glob(".*spill*")), "the spill folder was left behind"


@pytest.mark.parametrize(
    "column,cell,message",
    [
        ("time", "yesterday", "line 52: 'yesterday' is not a timestamp"),
        ("value", "abc", "line 52, column 'value': 'abc' is not a number"),
    ],
)
def test_long_bad_cell_in_a_later_partition_names_its_line(
    scheduler, tmp_path, column, cell, message
):
    ov = [o for o in write_case(tmp_path) if "time_column" not in o and "source.path" not in o]
    frame = _long_frame().astype({column: object})
    frame.loc[50, column] = cell
    frame.to_csv(tmp_path / "long.csv", index=False)
    extra = [
        "data.source.kind=long_csv",
        f"data.source.path={tmp_path / 'long.csv'}",
        "data.source.value_columns=[value, flow]",
        "data.source.partition_mb=0.001",
    ]
    expect_error(scheduler, tmp_path, ov + extra, message)
    assert not list(tmp_path.glob(".*spill*")), "the spill folder was left behind"


def test_hdf5_metr_la_layout(scheduler, tmp_path):
    ov = [o for o in write_case(tmp_path) if "time_column" not in o and "source.path" not in o]
    t = pd.date_range("2012-03-01", periods=50, freq="5min")
    frame = pd.DataFrame(np.random.default_rng(1).uniform(1, 70, (50, 4)), index=t, columns=IDS)
    frame.iloc[7, 2] = 0.0
    frame.to_hdf(tmp_path / "metr.h5", key="df", format="fixed")
    store = open_store(
        run(
            scheduler,
            ov
            + [
                "data.source.kind=hdf5",
                f"data.source.path={tmp_path / 'metr.h5'}",
                "data.source.sentinels=[0]",
            ],
        )
    )
    assert store.shape == (50, 4, 1) and store.attrs["freq"] == "5min"
    ids = list(store["sensor_id"][:])
    assert not store["mask"][7, ids.index("c3"), 0]
    np.testing.assert_allclose(store["values"][3, ids.index("a1"), 0], frame.iloc[3, 0], rtol=1e-6)


def _dataset(n=40, steps=120):
    """A [time, station] dataset of two variables, lat/lon along the stations, one missing
    time step (a gap in the axis) and some NaN."""
    import xarray as xr

    rng = np.random.default_rng(4)
    t = pd.date_range("2024-05-01", periods=steps, freq="10min").delete(30)  # gap at step 30
    ids = [f"st{i:03d}" for i in range(n)]
    pm25 = rng.gamma(4, 5, (len(t), n))
    pm25[rng.random(pm25.shape) < 0.05] = np.nan
    return xr.Dataset(
        {
            "pm25": (("time", "station"), pm25),
            "temp": (("time", "station"), rng.normal(15, 4, (len(t), n)).astype(np.float32)),
        },
        coords={
            "time": t,
            "station": ids,
            "lat": ("station", 48 + rng.uniform(0, 1, n)),
            "lon": ("station", 2 + rng.uniform(0, 1, n)),
        },
    )


def _xarray_overrides(tmp_path, path):
    return [
        "data.source.kind=xarray",
        f"data.source.path={path}",
        "data.source.sensor_column=station",
        "data.source.value_columns=[pm25, temp]",
        f"data.store={tmp_path / 'out.zarr'}",
        "data.time_in=4",
        "data.horizon=2",
        "data.neighbours=5",
        "data.node_chunk=16",
        "data.time_chunk=32",
    ]


@pytest.mark.parametrize("fmt", ["netcdf4", "netcdf3", "zarr"])
def test_xarray_sources_keep_every_value_with_its_sensor(scheduler, tmp_path, fmt):
    ds = _dataset()
    path = tmp_path / ("in.zarr" if fmt == "zarr" else "in.nc")
    if fmt == "zarr":
        ds.to_zarr(path, consolidated=False)
    else:
        ds.to_netcdf(path, engine="h5netcdf" if fmt == "netcdf4" else "scipy")
    store = open_store(run(scheduler, _xarray_overrides(tmp_path, path)))
    assert store.shape == (120, 40, 2) and store.attrs["freq"] == "10min"
    assert store.attrs["features"] == ["pm25", "temp"]
    ids = store["sensor_id"][:].tolist()
    values, mask = store["values"][:], store["mask"][:]
    assert not mask[30].any()  # the missing time step is a masked row
    rows = np.r_[0:30, 31:120]  # axis rows of the dataset's time steps
    for f, var in enumerate(["pm25", "temp"]):
        expect = ds[var].sel(station=ids).to_numpy()  # [time, store order]
        np.testing.assert_array_equal(mask[rows, :, f], ~np.isnan(expect))
        seen = mask[rows, :, f]
        np.testing.assert_allclose(values[rows, :, f][seen], expect[seen], rtol=1e-6)
    coords = store["coords"][:]
    np.testing.assert_allclose(coords[:, 0], ds["lat"].sel(station=ids).to_numpy())


def test_xarray_bad_input_names_the_variable_or_dimension(scheduler, tmp_path):
    ds = _dataset(n=8, steps=40)
    path = tmp_path / "in.nc"
    ds.to_netcdf(path, engine="h5netcdf")
    ov = _xarray_overrides(tmp_path, path)
    expect_error(
        scheduler, tmp_path, ov + ["data.source.value_columns=[pm10]"], "in.nc", "['pm10']", "pm25"
    )
    expect_error(
        scheduler,
        tmp_path,
        [o for o in ov if "sensor_column" not in o],
        "'pm25' has dimensions ['time', 'station']",
        "data.source.sensor_column",
    )
    ds.drop_vars(["lat", "lon"]).to_netcdf(tmp_path / "noloc.nc", engine="h5netcdf")
    expect_error(
        scheduler,
        tmp_path,
        ov + [f"data.source.path={tmp_path / 'noloc.nc'}"],
        "data.source.locations is not set",
    )
    (tmp_path / "junk.nc").write_text("not a dataset\n")
    expect_error(
        scheduler,
        tmp_path,
        ov + [f"data.source.path={tmp_path / 'junk.nc'}"],
        "junk.nc",
        "not a readable",
    )


def test_a_blank_line_mid_file_is_named(scheduler, tmp_path):
    ov = write_case(tmp_path)
    data = tmp_path / "data.csv"
    lines = data.read_text().splitlines()
    lines.insert(10, "")
    data.write_text("\n".join(lines) + "\n")
    expect_error(scheduler, tmp_path, ov, "data.csv, line 11: a blank line")


def test_blank_cells_are_missing_and_padded_cells_read_in_every_csv(scheduler, tmp_path):
    rows = [[r[0], " 1.5", "2 ", "\t3", "4"] for r in hourly_rows()]
    rows[7][2] = " "
    wide = open_store(run(scheduler, write_case(tmp_path, rows)))
    ids = list(wide["sensor_id"][:])
    assert wide["values"][0, ids.index("a1"), 0] == 1.5
    assert not wide["mask"][7, ids.index("b2"), 0] and wide["mask"][:, ids.index("b2")].sum() == 59
    frame = pd.DataFrame(
        [(s, r[0], r[1 + j]) for r in rows for j, s in enumerate(IDS)],
        columns=["sensor_id", "time", "value"],
    )
    (tmp_path / "long").mkdir()
    frame.to_csv(tmp_path / "long" / "long.csv", index=False)
    ov = [o for o in write_case(tmp_path / "long") if "time_column" not in o]
    ov = [o for o in ov if "source.path" not in o]
    ov += ["data.source.kind=long_csv", f"data.source.path={tmp_path / 'long' / 'long.csv'}"]
    long = open_store(run(scheduler, ov))
    np.testing.assert_array_equal(long["mask"][:], wide["mask"][:])
    np.testing.assert_array_equal(long["values"][:], wide["values"][:])


def test_an_absurd_value_names_its_sensor_and_time(scheduler, tmp_path):
    rows = hourly_rows()
    rows[7][2] = "1e30"
    expect_error(
        scheduler, tmp_path, write_case(tmp_path, rows), "'b2'", "2024-01-01T07:00:00", "1e+30"
    )


def test_a_directory_as_the_data_file(scheduler, tmp_path):
    (tmp_path / "dir").mkdir()
    ov = [o for o in write_case(tmp_path) if "source.path" not in o]
    expect_error(
        scheduler, tmp_path, ov + [f"data.source.path={tmp_path / 'dir'}"], "is a directory"
    )


def test_a_latin1_cell_without_the_encoding_key_names_its_line(scheduler, tmp_path):
    ov = write_case(tmp_path)
    data = tmp_path / "data.csv"
    lines = data.read_text().splitlines()
    lines[5] = lines[5].split(",")[0] + ",caf\xe9,1,2,3"
    data.write_bytes(("\n".join(lines) + "\n").encode("latin-1"))
    expect_error(scheduler, tmp_path, ov, "data.csv, line 6", "data.source.encoding")


def test_fewer_sensors_than_data_neighbours_is_said_not_silent(scheduler, tmp_path, capsys):
    ov = [o for o in write_case(tmp_path) if "data.neighbours" not in o]
    store = open_store(run(scheduler, [*ov, "data.neighbours=10"]))
    assert store["neighbours"].shape == (4, 4)
    assert "data.neighbours = 10, but the network has 4 sensors" in capsys.readouterr().out
