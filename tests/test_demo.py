"""The demo end to end on SmolLM2 (quick settings, embedded model, fixed layers)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from alphasteer_lens.artifacts import load_steering
from alphasteer_lens.experiments.demo import COLUMNS, DemoConfig, run_demo
from alphasteer_lens.gates import PROBE_C_GRID

METHODS = {"vanilla", "actadd", "cast", "actadd_calibrated", "alphasteer", "alphasteer_calibrated"}
GATED = ("cast", "actadd_calibrated", "alphasteer_calibrated")


@pytest.mark.smollm
def test_demo_quick_end_to_end(tmp_path: Path, smollm) -> None:  # type: ignore[no-untyped-def]
    cfg = DemoConfig(layers=(14, 15, 16, 17, 18), quick=True, **DemoConfig.QUICK)
    report = run_demo(tmp_path, cfg, progress=False)
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk["methods"].keys() == METHODS and on_disk["columns"] == list(COLUMNS)
    for m in on_disk["methods"].values():
        for col in COLUMNS:
            assert 0.0 <= m[f"{col}_refusal_rate"] <= 1.0
            assert isinstance(m[f"{col}_refusal_score"], float)
    vanilla = on_disk["methods"]["vanilla"]
    assert vanilla["benign_unchanged_fraction"] == vanilla["sensitive_unchanged_fraction"] == 1.0
    for gated in GATED:
        for col in COLUMNS:
            assert 0.0 <= on_disk["methods"][gated][f"{col}_steered_fraction"] <= 1.0
    gate = on_disk["gate"]
    assert gate["eps"] == 0.02 and gate["n_calibration"] == on_disk["data"]["calibration"]
    assert len(gate["tau"]) == 5 and all(t == t for t in gate["tau"])  # calibrated, not NaN
    assert gate["kind"] == "probe" and gate["probe_c_how"] == "cv on the fit sides"
    assert gate["probe_c"] in PROBE_C_GRID and set(gate["probe_cv_log_loss"]) == {
        str(c) for c in PROBE_C_GRID
    }
    # The probe gate separates on this model: it opens for held-out plain harmful requests far
    # more often than for MT-Bench (offline on the full sets: 92% vs 0%).
    calib = on_disk["methods"]["alphasteer_calibrated"]
    assert calib["harmful_steered_fraction"] >= calib["benign_steered_fraction"] + 0.25
    # The sets are disjoint where they must be: nothing held out was fitted or calibrated on.
    assert on_disk["data"]["jailbreak_test"] <= 12 and on_disk["data"]["sensitive_test"] > 0

    # A prompt whose gate stays closed gets vanilla's answer (the demo reuses it: the hooks add
    # exactly zero, which tests/test_gates.py checks bit for bit); the prompts it opens for are
    # generated again, steered.
    gens = pd.read_csv(tmp_path / "generations.csv", keep_default_na=False)
    base = gens[gens.method == "vanilla"].set_index(["set", "prompt"]).completion
    for gated in GATED:
        rows = gens[(gens.method == gated) & (gens.steered.astype(str) == "False")]
        if gated == "alphasteer_calibrated":  # ε = 2%: most benign prompts stay unsteered
            assert len(rows) > 0, f"{gated} steered every prompt"
        for r in rows.itertuples():
            assert r.completion == base[(r.set, r.prompt)], (gated, r.set, r.prompt)
    opened = gens[(gens.method == "alphasteer_calibrated") & (gens.steered.astype(str) == "True")]
    assert any(r.completion != base[(r.set, r.prompt)] for r in opened.itertuples())
    assert (gens[gens.method == "alphasteer"].steered == "").all()  # ungated: no decision

    assert set(on_disk["benign_leakage"]) == {str(layer) for layer in on_disk["layers"]}
    assert all(0.0 <= v < 0.06 for v in on_disk["benign_leakage"].values())  # README: 0.02-0.04
    assert on_disk["seconds"] == report["seconds"] > 0
    assert on_disk["peak_rss_mib"] > 100  # the model alone is ~540 MB in float32
    assert (tmp_path / "manifest.json").exists()
    steering = load_steering(tmp_path / "alphasteer.safetensors", model=smollm)
    assert list(steering.layers) == on_disk["layers"]
    summary = (tmp_path / "summary.md").read_text()
    assert "| alphasteer_calibrated |" in summary and "jailbreak_refusal_rate" in summary
