"""The demo end to end on SmolLM2 (quick settings, embedded model, fixed layers)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from alphasteer_lens.artifacts import load_steering
from alphasteer_lens.experiments.demo import DemoConfig, run_demo


@pytest.mark.smollm
def test_demo_quick_end_to_end(tmp_path: Path, smollm) -> None:  # type: ignore[no-untyped-def]
    cfg = DemoConfig(layers=(14, 15, 16, 17, 18), quick=True, **DemoConfig.QUICK)
    report = run_demo(tmp_path, cfg, progress=False)
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk["methods"].keys() == {"vanilla", "actadd", "alphasteer"}
    for m in on_disk["methods"].values():
        for key in (
            "harmful_refusal_rate",
            "benign_refusal_rate",
            "benign_unchanged_fraction",
            "harmful_refusal_score",
            "benign_refusal_score",
        ):
            assert isinstance(m[key], float)
        assert 0.0 <= m["harmful_refusal_rate"] <= 1.0
    assert on_disk["methods"]["vanilla"]["benign_unchanged_fraction"] == 1.0
    assert set(on_disk["benign_leakage"]) == {str(layer) for layer in on_disk["layers"]}
    assert all(0.0 <= v < 0.2 for v in on_disk["benign_leakage"].values())
    assert on_disk["seconds"] == report["seconds"] > 0
    assert on_disk["peak_rss_mib"] > 100  # the model alone is ~540 MB in float32
    assert (tmp_path / "manifest.json").exists() and (tmp_path / "generations.csv").exists()
    steering = load_steering(tmp_path / "alphasteer.safetensors", model=smollm)
    assert list(steering.layers) == on_disk["layers"]
    assert "| alphasteer |" in (tmp_path / "summary.md").read_text()
