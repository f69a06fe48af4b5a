"""MLflow tracking and the model registry (the only module that imports mlflow).

Active on rank 0 only; elsewhere every method is a no-op. Tracking URI: ``tracking.uri``, else
``$MLFLOW_TRACKING_URI``, else the embedded ``sqlite:///mlruns.db`` in the working directory.
A server URI that does not answer is an error before training starts.

Logged: the flattened config (params) and the config file, the store's fingerprint and the git
commit (tags); the train loss, learning rate and learned range/nugget per head per step;
validation metrics per evaluation; test metrics; figures (learned correlation against the
empirical variogram of the training data and the truth, PIT histogram, a forecast fan chart,
loss curves); the model as a pyfunc registered under ``tracking.model_name`` with alias
``candidate``: logged as code (MLflow's models from code: the artifact holds
pipeline/track/pyfunc_model.py, which names our installed :class:`ForecastPyfunc`, and the
exported files, no pickle), with every artifact file's sha256 recorded in the tracking store;
:func:`load_model` and ``launch/serve.py`` check them before anything of the model is loaded.

An outage of the server never stalls or stops training (README, "Reliability"): per-step
metrics go to MLflow from a background thread (pipeline/track/sender.py), HTTP requests retry
briefly (``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` / ``_TIMEOUT`` unless set), and batches the server
did not take are appended to ``<run dir>/mlflow_unsent.jsonl`` and replayed when it answers
again, or by the next run that resumes. A resumed run continues its MLflow run (its id is in
``<run dir>/mlflow_run``); a run that crashed is recorded as FAILED.
"""

from __future__ import annotations

import contextlib
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import mlflow
import yaml
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from pipeline.config import Config, flatten
from pipeline.data.store import Store
from pipeline.evaluate.diagnostics import close_figures, run_figures, sweep_bars
from pipeline.evaluate.metrics import test_row, validation_row
from pipeline.model.export import Predictor
from pipeline.track import checksums
from pipeline.track.endpoint import (
    HTTP_DEFAULTS,
    TrackingError,
    artifact_root,
    check_reachable,
    git_commit,
    tracking_uri,
)
from pipeline.track.sender import MetricSender

FLUSH_S = 30.0  # at the end of training, wait at most this long for unsent metrics
VALIDATION_FLUSH_S = 15.0  # after a validation, while the server answers (log_validation)
MODEL_CODE = Path(__file__).with_name("pyfunc_model.py")  # the registered model's code
PIP_REQUIREMENTS = ["torch", "numpy", "pydantic>=2", "pyyaml", "scipy", "zarr>=3", "mlflow"]


def connect(cfg: Config, experiment: bool = True) -> str:
    """Point MLflow at ``cfg``'s tracking URI (checked first) and, with ``experiment``, at its
    experiment (created with its artifacts beside an embedded store's database); returns the
    URI."""
    uri = tracking_uri(cfg)
    check_reachable(uri)
    mlflow.set_tracking_uri(uri)
    name, root = cfg.tracking.experiment, artifact_root(uri)
    if experiment and root and mlflow.get_experiment_by_name(name) is None:
        # (created meanwhile by another trial: that one is used)
        with contextlib.suppress(mlflow.exceptions.MlflowException):
            mlflow.create_experiment(name, artifact_location=root)
    if experiment:
        mlflow.set_experiment(name)
    return uri


def estimate_row(estimate: dict[str, float]) -> dict[str, float]:
    """The kernel estimate as kernel.range_estimate_km, kernel.nugget_estimate, ..."""
    return {
        f"kernel.{'range_estimate_km' if k == 'range_km' else k + '_estimate'}": v
        for k, v in estimate.items()
    }


class ForecastPyfunc(mlflow.pyfunc.PythonModel):
    """The registered model. Input: a dict with ``x`` [batch, time_in, sensors, features]
    (data units, NaN = missing, sensors in the order of the model's ``network.npz``) and
    ``origin_time`` [batch] (int64 ns UTC of the first forecast step), and optionally
    ``query`` [points, 2] (coordinates without a sensor, as the network's). Output: a dict with
    ``mean`` and ``std`` [batch, horizon, sensors, forecast features] in data units, and with a
    query ``query_mean`` and ``query_std`` [batch, horizon, points, forecast features]."""

    def load_context(self, context) -> None:
        self.predictor = Predictor(context.artifacts["model"])

    def predict(self, context, model_input, params=None):
        missing = [k for k in ("x", "origin_time") if k not in model_input]
        if missing:
            raise ValueError(
                f"model input lacks {', '.join(missing)}: give a dict with 'x' [batch, time_in, "
                "sensors, features] and 'origin_time' [batch] (int64 ns UTC)"
            )
        query = model_input.get("query")
        return self.predictor.predict(model_input["x"], model_input["origin_time"], query=query)


def set_forecast_model() -> None:
    """Called by the registered model's code (pyfunc_model.py) when MLflow loads it."""
    mlflow.models.set_model(ForecastPyfunc())


class Tracker:
    """One MLflow run of a training job (no-op when inactive)."""

    def __init__(
        self,
        cfg: Config,
        active: bool = True,
        parent_run_id: str | None = None,
        tags: dict[str, str] | None = None,
    ) -> None:
        self.cfg = cfg
        self.active = active and cfg.tracking.enabled
        self.parent_run_id, self.tags = parent_run_id, tags or {}
        self.run_id: str | None = None
        self.sender: MetricSender | None = None
        self.train_losses: list[tuple[int, float]] = []
        self.run_dir = Path(cfg.train.out_dir) / cfg.name
        self.id_file = self.run_dir / "mlflow_run"

    def start(self, store: Store, resuming: bool = False) -> None:
        """Open the run: the run's own MLflow run again when ``resuming`` (a checkpoint will be
        loaded) and it exists in this store, else a new one (an earlier one left RUNNING by a
        crash is marked KILLED)."""
        if not self.active:
            return
        for key, value in HTTP_DEFAULTS.items():
            os.environ.setdefault(key, value)
        uri = connect(self.cfg)
        client = MlflowClient()
        previous = self._previous_run(client)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if resuming and previous is not None:
            self.run_id = previous.info.run_id
            client.update_run(self.run_id, status="RUNNING")
            print(f"MLflow: continuing run {self.run_id}")
        else:
            if previous is not None and previous.info.status == "RUNNING":
                client.set_terminated(previous.info.run_id, "KILLED")
            (self.run_dir / "mlflow_unsent.jsonl").unlink(missing_ok=True)
            self._new_run(client, store)
            self.id_file.write_text(self.run_id)
        run_id = self.run_id

        def send(batch: dict) -> None:
            metrics = [
                Metric(key, float(value), batch["time_ms"], batch["step"])
                for key, value in batch["metrics"].items()
            ]
            client.log_batch(run_id, metrics=metrics, synchronous=True)

        self.sender = MetricSender(send, self.run_dir / "mlflow_unsent.jsonl", f"MLflow at {uri}")

    def _previous_run(self, client: MlflowClient):
        if not self.id_file.is_file():
            return None
        try:
            return client.get_run(self.id_file.read_text().strip())
        except mlflow.exceptions.MlflowException:  # another tracking store: start afresh
            return None

    def _new_run(self, client: MlflowClient, store: Store) -> None:
        tags = {
            **self.tags,
            "store": str(store.path),
            "store_fingerprint": store.fingerprint(),
            "git_commit": git_commit(),
        }
        if self.parent_run_id:  # a trial of a sweep: a child of the sweep's run
            tags["mlflow.parentRunId"] = self.parent_run_id
        experiment = client.get_experiment_by_name(self.cfg.tracking.experiment)
        run = client.create_run(experiment.experiment_id, run_name=self.cfg.name, tags=tags)
        self.run_id = run.info.run_id
        params = [Param(k, str(v)[:500]) for k, v in flatten(self.cfg).items()]
        client.log_batch(self.run_id, params=params, synchronous=True)
        client.log_text(
            self.run_id, yaml.safe_dump(self.cfg.model_dump(), sort_keys=False), "config.yaml"
        )

    def log_step(self, step: int, loss: float, kernels: list[dict], lr: float) -> None:
        if not self.active:
            return
        self.train_losses.append((step, loss))
        metrics = {"train_loss": loss, "lr": lr}
        for layer in kernels:
            for key in ("range_km", "nugget"):
                for h, v in enumerate(layer.get(key, [])):
                    metrics[f"{key}_l{layer['layer']}_h{h}"] = v
        self.sender.put(step, metrics)

    def log_validation(self, step: int, val: dict) -> None:
        if not self.active:
            return
        self.sender.put(step, {"val_loss": val["loss"], **validation_row(val)})
        # in MLflow before the validation is reported to a sweep, whose scheduler may stop the
        # trial at once (its process can end before a background send); no wait while the
        # server is away: the batch is then in the unsent file
        if self.sender.online:
            self.sender.flush(VALIDATION_FLUSH_S)

    def finish(self, metrics: dict, model_dir: Path, store: Store) -> str | None:
        """Log test metrics, figures and the model; register it; end the run.
        Returns the registered model URI (``models:/NAME@candidate``) or the run's model URI;
        None, with a warning, when the server does not answer (the run stays open)."""
        if not self.active:
            return None
        if not self._answers() or not self.sender.flush(FLUSH_S):
            self.sender.close()
            print(
                f"warning: MLflow at {tracking_uri(self.cfg)} does not answer: test metrics, "
                f"figures and the model were not logged (they are in {self.run_dir}); run the "
                "same command again once it answers (train.resume=auto) to log and register "
                f"them in run {self.run_id}",
                file=sys.stderr,
                flush=True,
            )
            return None
        self.sender.close()
        with mlflow.start_run(run_id=self.run_id):
            mlflow.log_metrics(test_row(metrics["test"]))
            mlflow.log_metrics(estimate_row(metrics.get("kernel_estimate") or {}))
            mlflow.log_dict(metrics, "metrics.json")
            self._log_figures(metrics, model_dir, store)
            uri = None
            if self.cfg.tracking.log_model:
                uri = self._log_model(model_dir)
        return uri

    def fail(self, exc: BaseException) -> None:
        """Record the run as FAILED (KILLED when interrupted), if the server answers."""
        if not self.active or self.run_id is None:
            return
        if self.sender is not None:
            self.sender.flush(5.0)
            self.sender.close()
        status = "FAILED" if isinstance(exc, Exception) else "KILLED"
        if self._answers():
            MlflowClient().set_terminated(self.run_id, status)

    def _answers(self) -> bool:
        try:
            check_reachable(tracking_uri(self.cfg))
        except TrackingError:
            return False
        return True

    def _log_figures(self, metrics: dict, model_dir: Path, store: Store) -> None:
        figures = run_figures(self.cfg, metrics, store, model_dir, self.train_losses)
        for name, fig in figures.items():
            mlflow.log_figure(fig, f"figures/{name}.png")
        close_figures()

    def _log_model(self, model_dir: Path) -> str:
        name, client = self.cfg.tracking.model_name, MlflowClient()
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(MODEL_CODE),
            artifacts={"model": str(model_dir)},
            pip_requirements=PIP_REQUIREMENTS,
            registered_model_name=name,
        )
        # the files as the artifact store holds them, read back once
        with tempfile.TemporaryDirectory() as tmp:
            sums = checksums.encode(checksums.digest(_download(info.model_uri, tmp)))
        client.set_tag(self.run_id, checksums.TAG, sums)
        if name is None:
            return info.model_uri
        version = str(info.registered_model_version)
        client.set_model_version_tag(name, version, checksums.TAG, sums)
        client.set_registered_model_alias(name, "candidate", version)
        return f"models:/{name}@candidate"


def _download(uri: str, dst: str) -> Path:
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=dst))


def recorded_checksums(uri: str) -> tuple[str | None, str, str]:
    """The checksums the tracking store holds for the model at ``uri`` (``models:/NAME@ALIAS``,
    ``models:/NAME/VERSION`` or ``runs:/RUN/model``), a name for it in messages, and where its
    files are (a version's logged model, whose files are the ones the checksums cover)."""
    client = MlflowClient()
    try:
        if uri.startswith("models:/"):
            ref = uri[len("models:/") :]
            if "@" in ref:
                name, alias = ref.split("@", 1)
                version = client.get_model_version_by_alias(name, alias)
            else:
                name, number = ref.rsplit("/", 1)
                version = client.get_model_version(name, number)
            return version.tags.get(checksums.TAG), f"{uri} (v{version.version})", version.source
        if uri.startswith("runs:/"):
            run_id = uri[len("runs:/") :].split("/", 1)[0]
            return client.get_run(run_id).data.tags.get(checksums.TAG), uri, uri
    except mlflow.exceptions.MlflowException as exc:
        raise TrackingError(f"{uri}: {str(exc).splitlines()[0]}") from None
    raise TrackingError(f"{uri}: give models:/NAME@ALIAS, models:/NAME/VERSION or runs:/RUN/model")


def fetch_verified(uri: str, dst: str | Path) -> Path:
    """Download the model at ``uri`` into ``dst`` and check its files against the checksums
    in the tracking store (:class:`checksums.ArtifactChanged` names a difference); returns the
    model's local folder, which MLflow can load or serve."""
    recorded, what, source = recorded_checksums(uri)
    local = _download(source, str(dst))
    checksums.verify(local, recorded, what)
    return local


def serve(cfg: Config) -> int:
    """``mlflow models serve`` of ``tracking.model_name`` at ``tracking.serve_alias``, from a
    local copy checked against the recorded checksums, on ``serve_host:serve_port``, in this
    environment (the pipeline installed); returns the server's exit status."""
    connect(cfg, experiment=False)
    if cfg.tracking.model_name is None:
        raise TrackingError("tracking.model_name is not set: no registered model to serve")
    uri = f"models:/{cfg.tracking.model_name}@{cfg.tracking.serve_alias}"
    with tempfile.TemporaryDirectory() as tmp:
        local = fetch_verified(uri, tmp)
        host, port = cfg.tracking.serve_host, str(cfg.tracking.serve_port)
        print(f"serving {uri} (checksums verified) on http://{host}:{port}/invocations", flush=True)
        command = ["models", "serve", "-m", str(local), "--env-manager", "local"]
        # MLflow starts uvicorn by name: this environment's, also when it is not activated;
        # glibc would give each of the server's request threads a malloc arena of its own,
        # each keeping freed request buffers: two arenas bound what it keeps
        path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
        env = {"MALLOC_ARENA_MAX": "2", **os.environ, "PATH": path}
        return subprocess.call(
            [sys.executable, "-m", "mlflow", *command, "-h", host, "-p", port], env=env
        )


def load_model(uri: str):
    """The registered (or logged) model at ``uri`` as an MLflow pyfunc, loaded only after its
    files match the checksums recorded at registration: nothing of a changed artifact runs.
    Use it (or ``launch/serve.py``) rather than ``mlflow.pyfunc.load_model``, which runs
    whatever code the artifact store holds."""
    with tempfile.TemporaryDirectory() as tmp:
        return mlflow.pyfunc.load_model(str(fetch_verified(uri, tmp)))


def promote(cfg: Config) -> dict[str, Any]:
    """Move alias ``champion`` to ``candidate`` when the candidate's test metric is lower."""
    connect(cfg, experiment=False)
    client, name, metric = MlflowClient(), cfg.tracking.model_name, cfg.tracking.promote_metric
    if name is None:
        raise TrackingError("tracking.model_name is not set: nothing to promote")

    def score(alias: str) -> tuple[str, float] | None:
        try:
            version = client.get_model_version_by_alias(name, alias)
        except mlflow.exceptions.MlflowException:
            return None
        run = client.get_run(version.run_id)
        if metric not in run.data.metrics:
            raise TrackingError(
                f"run {version.run_id} of {name} v{version.version} has no "
                f"metric {metric!r} (tracking.promote_metric)"
            )
        return version.version, run.data.metrics[metric]

    candidate = score("candidate")
    if candidate is None:
        raise TrackingError(f"registered model {name!r} has no version with alias 'candidate'")
    if not math.isfinite(candidate[1]):
        raise TrackingError(
            f"{name} v{candidate[0]} has {metric} = {candidate[1]}: a model without a finite "
            "score is never promoted"
        )
    champion = score("champion")
    promoted = (
        champion is None
        or not math.isfinite(champion[1])  # a champion without a finite score is replaced
        or (candidate[0] != champion[0] and candidate[1] < champion[1])
    )
    if promoted:
        client.set_registered_model_alias(name, "champion", candidate[0])
    return {
        "model": name,
        "metric": metric,
        "candidate": candidate,
        "champion": champion,
        "promoted": promoted,
    }


class SweepTracker:
    """The parent MLflow run of a Ray Tune sweep; its id is kept in the sweep folder so that a
    resumed sweep logs into the same run."""

    def __init__(self, cfg: Config, out: Path) -> None:
        self.cfg, self.id_file = cfg, out / "mlflow_parent_run"
        self.active = cfg.tracking.enabled
        self.run_id: str | None = None

    def start(self) -> str | None:
        if not self.active:
            return None
        connect(self.cfg)
        previous = self.id_file.read_text().strip() if self.id_file.is_file() else None
        if previous and self.cfg.tune.resume:
            run = mlflow.start_run(run_id=previous)
        else:
            run = mlflow.start_run(run_name=f"sweep-{self.cfg.name}", tags={"sweep": "true"})
            mlflow.log_params({k: str(v)[:500] for k, v in flatten(self.cfg).items()})
            self.id_file.write_text(run.info.run_id)
        self.run_id = run.info.run_id
        return self.run_id

    def finish(self, summary: dict) -> None:
        if not self.active:
            return
        # trials that ASHA stopped (or that crashed) never ended their runs: end them here
        client = MlflowClient()
        children = client.search_runs(
            [mlflow.get_experiment_by_name(self.cfg.tracking.experiment).experiment_id],
            filter_string=f"tags.mlflow.parentRunId = '{self.run_id}' and "
            "attributes.status = 'RUNNING'",
        )
        for run in children:
            client.set_tag(run.info.run_id, "stopped_early_by", "asha")
            client.set_terminated(run.info.run_id, "KILLED")
        mlflow.log_text(summary["table"], "sweep_table.md")
        mlflow.log_dict({"trials": summary["trials"]}, "sweep_trials.json")
        if summary["by_family"]:
            fig = sweep_bars(summary["by_family"], self.cfg.tune.metric)
            mlflow.log_figure(fig, "figures/sweep.png")
            close_figures()
        if summary.get("best_yaml"):
            mlflow.log_artifact(summary["best_yaml"])
        if summary["best"] is not None:
            mlflow.log_metric(f"best_{self.cfg.tune.metric}", summary["best"]["metric"])

    def close(self) -> None:
        if self.active and mlflow.active_run() is not None:
            mlflow.end_run()
