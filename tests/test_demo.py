"""The demo's line on what the kernel gains over `none`: the figure recorded by
benchmarks/demo_gain.py for the shipped config, and never claimed for another one."""

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _demo():
    spec = importlib.util.spec_from_file_location("demo", ROOT / "launch" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_recorded_gain_is_printed_for_the_shipped_config():
    recorded = json.loads((ROOT / "docs" / "demo_gain.json").read_text())
    line = _demo().kernel_gain(str(ROOT / "configs" / "small.yaml"), [])
    assert f"{recorded['ours']['crps']['mean']:.4f}" in line
    assert f"{recorded['none']['crps']['mean']:.4f}" in line
    assert f"p {recorded['dm']['crps']['p_value']:.2g}" in line
    assert len(recorded["seeds"]) >= 3  # a comparison over seeds


def test_no_gain_is_claimed_for_another_config_or_overrides():
    demo = _demo()
    for config, overrides in [
        (str(ROOT / "configs" / "aqi36.yaml"), []),
        (str(ROOT / "configs" / "small.yaml"), ["model.kernel=exponential"]),
    ]:
        line = demo.kernel_gain(config, overrides)
        assert "as shipped only" in line and "CRPS" not in line
