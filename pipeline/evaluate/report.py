"""A plain-text summary of a run's metrics.json (printed by the demo and by training)."""

from __future__ import annotations


def _p(p: float) -> str:
    """A p-value; 0 is an underflow of the tail probability (below ~1e-300)."""
    return "< 1e-300" if p == 0 else f"{p:.2g}"


def dm_text(dm: dict) -> str:
    """A Diebold-Mariano result in a few words: statistic and p, or why it is not testable."""
    if not dm["testable"]:
        return f"not testable ({dm['reason']})"
    return f"{dm['statistic']:+.2f} (p {_p(dm['p_value'])})"


def summary(metrics: dict, tracking_uri: str | None = None) -> str:
    test = metrics["test"]
    lines = [
        f"run {metrics['name']}: {metrics['steps']} steps on {metrics['world_size']} "
        f"process(es), {metrics['device']}, {metrics['precision']}",
        "",
        "test split, per horizon step:",
        "  step    MAE      RMSE     CRPS     cover50  cover90",
    ]
    for i, h in enumerate(test["horizon_steps"]):
        lines.append(
            f"  {h:>4} {test['mae'][i]:8.4f} {test['rmse'][i]:8.4f} {test['crps'][i]:8.4f}"
            f" {test['coverage_50'][i]:8.3f} {test['coverage_90'][i]:8.3f}"
        )
    m = test["mean"]
    lines.append(
        f"  mean {m['mae']:8.4f} {m['rmse']:8.4f} {m['crps']:8.4f} "
        f"{m['coverage_50']:8.3f} {m['coverage_90']:8.3f}"
    )
    lines.append(f"  PIT distance from uniform: {test['pit_uniform_distance']:.3f}")
    for group in ("seen", "unseen"):
        if group in test:  # data.holdout_sensors
            g = test[group]
            ratio = f", {g['ratio_to_oracle']:.3f} x the oracle" if "ratio_to_oracle" in g else ""
            what = "held out of training" if group == "unseen" else "trained on"
            lines.append(
                f"  {group} sensors ({g['sensors']}, {what}): MAE {g['mean']['mae']:.4f}, "
                f"CRPS {g['mean']['crps']:.4f}{ratio}"
            )
    for name, f in test.get("per_feature", {}).items():  # several features: each apart
        if f["count"] == 0:
            lines.append(f"  feature {name}: no observed target in the test split")
            continue
        fm = f["mean"]
        lines.append(
            f"  feature {name}: MAE {fm['mae']:.4f}, RMSE {fm['rmse']:.4f}, CRPS "
            f"{fm['crps']:.4f}, cover90 {fm['coverage_90']:.3f} ({f['count']} targets)"
        )
    for name, base in test.get("baselines", {}).items():
        lines.append(
            f"  vs {name} (MAE {base['mae']:.4f}, CRPS {base['crps']:.4f}): Diebold-Mariano on MAE "
            f"{dm_text(base['dm_mae'])}, on CRPS {dm_text(base['dm_crps'])}; negative = model "
            "better"
        )
    mi = test.get("morans_i")
    if mi is not None and mi["testable"]:
        lines.append(
            f"  Moran's I of the sensors' mean residuals: {mi['I']:.3f} "
            f"(expected {mi['expected']:.3f}, p {_p(mi['p_value'])}, {mi['n']} sensors)"
        )
    elif mi is not None:
        lines.append(f"  Moran's I of the sensors' mean residuals: not testable ({mi['reason']})")
    oracle = metrics.get("oracle") or {}
    if "ratio_to_oracle" in test:
        w, f = oracle["window"], oracle["full_past"]
        lines.append(
            f"  Bayes limit (exact Kalman forecast of the synthetic field): CRPS "
            f"{w['mean']['crps']:.4f} given the input window, {f['mean']['crps']:.4f} given the "
            f"whole past; model / window oracle = {test['ratio_to_oracle']['mean']:.3f}, "
            f"Diebold-Mariano {dm_text(test['dm_vs_oracle'])}"
        )
        if w["morans_i"]["testable"]:
            lines.append(
                f"  oracle's Moran's I of residuals: {w['morans_i']['I']:.3f} (the model's "
                "should be compared with this, not with 0)"
            )
    elif "skipped" in oracle:
        lines.append(f"  Bayes limit not computed: {oracle['skipped']}")
    gp = metrics.get("fitted_gp") or {}
    if "fit" in gp:
        f = gp["fit"]
        ratio = f", {gp['ratio_to_oracle']:.3f} x the oracle" if "ratio_to_oracle" in gp else ""
        lines.append(
            f"  fitted GP (train split's variogram): {f['family']}, range {f['range_km']:.1f} km, "
            f"sill {f['sill']:.2f}, micro-scale {f['micro']:.2f}, nugget {f['nugget']:.2f}, AR(1) "
            f"{f['phi']:.2f}; CRPS "
            f"{gp['mean']['crps']:.4f}{ratio}"
        )
    elif "skipped" in gp:
        lines.append(f"  fitted GP not computed: {gp['skipped']}")
    lines.append("")
    truth = metrics.get("truth")
    for layer in metrics["kernel"]:
        ranges = ", ".join(f"{r:.1f}" for r in layer["range_km"])
        nuggets = ", ".join(f"{t:.2f}" for t in layer["nugget"])
        lines.append(f"learned range (km) layer {layer['layer']}: {ranges}; nugget: {nuggets}")
    estimate = metrics.get("kernel_estimate")
    if estimate:
        shape = (
            f", major axis {estimate['angle_deg']:.0f} deg, axis ratio {estimate['axis_ratio']:.2f}"
            if "angle_deg" in estimate
            else ""
        )
        lines.append(
            f"range estimate (the field's variogram, fitted in training): "
            f"{estimate['range_km']:.1f} km, nugget fraction {estimate['nugget']:.2f}{shape}"
        )
    if truth:
        shape = (
            f", major axis {truth['anisotropy_angle_deg']:.0f} deg, axis ratio "
            f"{truth['anisotropy_ratio']:.2f}"
            if truth.get("anisotropy_ratio", 1.0) < 1.0
            else ""
        )
        lines.append(
            f"true range: {truth['range_km']} km ({truth['family']}), nugget fraction "
            f"{truth['nugget_fraction']:.2f}{shape}"
        )
    timing = metrics.get("timing", {})
    if timing:
        lines.append(
            f"speed: {timing['samples_per_s']:.1f} windows/s, data wait "
            f"{timing['data_wait_fraction']:.1%} of step time"
        )
    if metrics.get("model_uri"):
        lines.append(f"registered model: {metrics['model_uri']}")
    if tracking_uri:
        lines.append(f"MLflow UI: mlflow ui --backend-store-uri {tracking_uri} --host 127.0.0.1")
    return "\n".join(lines)
