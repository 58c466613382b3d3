"""Multi-objective search: seeded reproducibility, SQLite resume, outputs."""

from __future__ import annotations

import pytest
import torch

from alphasteer_lens.gates import CalibratedAlphaSteer, GateProbe
from alphasteer_lens.search import (
    SearchSpace,
    TrialParams,
    build_steering,
    evaluate,
    pareto_figure,
    pareto_frame,
    prepare_search_data,
    run_study,
    trials_frame,
)

optuna = pytest.importorskip("optuna")

WORDS = ["fox", "river", "bake", "poem", "cloud", "math", "green", "train", "song", "shell"]


def _prompts(kind: str, n: int) -> list[str]:
    return [f"{kind} {WORDS[i % 10]} {WORDS[(i * 3) % 10]} number {i}?" for i in range(n)]


@pytest.fixture(scope="module")
def data(tiny):  # type: ignore[no-untyped-def]
    return prepare_search_data(
        tiny,
        layers=[1, 2, 3],
        fit_benign=_prompts("Tell me about", 24),
        fit_malicious=_prompts("How to hurt with", 12),
        calibration=_prompts("Please describe", 20),
        val_harmful=_prompts("Explain how to attack", 4),
        val_benign=_prompts("Write a note on", 4),
        allow_rank_deficient=True,
        progress=False,
    )


SPACE = SearchSpace(layer_min=1, layer_max=3, width=(1, 2), strength=(0.5, 8.0))


def test_build_steering_and_evaluate(data, tiny) -> None:  # type: ignore[no-untyped-def]
    p = TrialParams(start=2, width=5, strength=2.0, ratio=0.5, alpha=1.0)
    st = build_steering(data, p)
    assert st.layers == (2, 3)  # cut at layer_max
    gated = build_steering(data, TrialParams(2, 2, 2.0, 0.5, 1.0, gate="calibrated", eps=0.1))
    assert isinstance(gated, CalibratedAlphaSteer) and gated.tau is not None
    res = evaluate(tiny, data, p)
    assert res["harmful_steered_frac"] == 1.0 and res["benign_kl"] > 0
    # a gate that never fires costs nothing and changes nothing
    shut = TrialParams(2, 2, 2.0, 0.5, 1.0, gate="calibrated", eps=0.01)  # n=20: τ = +inf
    r0 = evaluate(tiny, data, shut)
    assert r0["benign_kl"] == 0.0 and r0["benign_steered_frac"] == 0.0
    assert r0["harmful_refusal"] == pytest.approx(r0["vanilla_harmful_refusal"])


def test_probe_gate_in_the_search(data, tiny) -> None:  # type: ignore[no-untyped-def]
    p = TrialParams(2, 2, 2.0, 0.5, 1.0, gate="probe", eps=0.1, probe_c=0.5)
    st = build_steering(data, p)
    ref = GateProbe.fit(data.fit_malicious, data.fit_benign, [2, 3], C=0.5)
    assert isinstance(st, CalibratedAlphaSteer) and st.probe is not None
    torch.testing.assert_close(st.probe.u, ref.u)
    torch.testing.assert_close(st.probe.b, ref.b)
    again = build_steering(data, p)
    assert isinstance(again, CalibratedAlphaSteer) and again.probe is st.probe  # fitted once
    # split conformal on the probe's logits: τ is the ⌈(n+1)(1−ε)⌉-th smallest of each
    # calibration prompt's largest logit over the layers (n = 20, ε = 0.1: the 19th)
    logits = torch.stack(
        [ref.scores(i, data.calibration[x].float()).double() for i, x in enumerate((2, 3))], 1
    )
    want = float(logits.max(1).values.sort().values[18])
    assert st.tau is not None and len(st.tau) == 2
    assert st.tau == pytest.approx((want, want), rel=1e-5, abs=1e-6)
    res = evaluate(tiny, data, p)
    fired = st.decisions(data.val_harmful_acts).gt(0).any(1).float().mean()
    assert res["harmful_steered_frac"] == pytest.approx(float(fired))
    assert TrialParams.from_dict({**p.__dict__}) == p
    with pytest.raises(ValueError, match="probe_c"):
        build_steering(data, TrialParams(2, 2, 2.0, 0.5, 1.0, gate="probe", eps=0.1))


def test_search_is_reproducible_with_a_seed(data, tiny, tmp_path) -> None:  # type: ignore[no-untyped-def]
    a = run_study(tiny, data, SPACE, n_trials=4, seed=7, storage=tmp_path / "a.db", progress=False)
    b = run_study(tiny, data, SPACE, n_trials=4, seed=7, storage=tmp_path / "b.db", progress=False)
    assert [t.params for t in a.trials] == [t.params for t in b.trials]
    assert [t.values for t in a.trials] == [t.values for t in b.trials]
    c = run_study(tiny, data, SPACE, n_trials=4, seed=8, progress=False)
    assert [t.params for t in c.trials] != [t.params for t in a.trials]


def test_study_resumes_from_sqlite(data, tiny, tmp_path) -> None:  # type: ignore[no-untyped-def]
    db = tmp_path / "study.db"
    run_study(tiny, data, SPACE, n_trials=3, seed=0, storage=db, progress=False)
    study = run_study(tiny, data, SPACE, n_trials=2, seed=0, storage=db, progress=False)
    assert [t.number for t in study.trials] == [0, 1, 2, 3, 4]
    loaded = optuna.load_study(study_name="alphasteer", storage=f"sqlite:///{db}")
    assert len(loaded.trials) == 5
    df = trials_frame(loaded)
    assert len(df) == 5 and df["pareto"].any()
    front = pareto_frame(loaded)
    assert list(front["harmful_refusal"]) == sorted(front["harmful_refusal"], reverse=True)
    fig = pareto_figure(df)
    assert len(fig.data) >= 1
    assert {"start", "width", "strength", "ratio", "alpha", "gate", "benign_kl"} <= set(df.columns)


def test_bad_space() -> None:
    with pytest.raises(ValueError):
        SearchSpace(layer_min=3, layer_max=1)
    with pytest.raises(ValueError):
        SearchSpace(layer_min=0, layer_max=1, gates=("cast",))
    assert SearchSpace(0, 2).layers == (0, 1, 2)
    torch.manual_seed(0)


def test_search_pipeline_end_to_end_on_the_tiny_model(tiny, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The pipeline's quick path on the tiny model: four columns, a resumable study, figures."""
    from alphasteer_lens.experiments import search_pipeline as sp
    from alphasteer_lens.formats import default_format

    monkeypatch.setattr(sp, "load", lambda cfg: (tiny, default_format(tiny.tokenizer)))
    cfg = sp.SearchConfig(
        layers=(1, 2, 3), n_trials=3, population=3, max_width=2, n_fit_benign=40,
        n_sensitive_fit=10, n_harmful_train=30, n_fit_jailbreak=4, n_in_the_wild=0,
        n_val_jailbreak=2, n_val=3, n_calibration=60, n_test=2, top_k=1, max_new_tokens=3,
        strengths=(1.0,), fit_families=("simple",), test_families=("gcg", "encoding"),
        batch_size=8, max_prompt_chars=300,
    )  # fmt: skip
    report = sp.run_search(cfg, tmp_path)
    assert report["n_trials_total"] == 3
    methods = [r["method"] for r in report["recheck"]]
    assert methods[0] == "vanilla" and "actadd" in methods and "cast" in methods
    for col in sp.COLUMNS:
        assert f"{col}_refusal" in report["recheck"][0]
    assert (tmp_path / "study.db").exists() and (tmp_path / "pareto.html").exists()
    import json

    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["command"] == "search" and manifest["layers"]["searched"] == [1, 2, 3]
    assert manifest["data"]["calibration"]["n"] == report["sizes"]["calibration"]
    assert (tmp_path / "summary.md").read_text().count("|") > 10
    # The top point as demo settings, which the demo's config loader accepts as they are.
    from alphasteer_lens.experiments.config import build_config
    from alphasteer_lens.experiments.demo import DemoConfig

    demo = build_config(DemoConfig, toml=tmp_path / "demo.toml")
    assert report["demo_settings"]["strengths"] == [demo.strengths[0]]
    chosen = next(r for r in report["recheck"] if r["method"].startswith("search#"))
    start, width = int(chosen["info_start"]), int(chosen["info_width"])
    assert demo.layers == tuple(x for x in range(start, start + width) if x <= 3)  # layer_max 3
    assert (demo.ratio, demo.alpha) == pytest.approx((chosen["info_ratio"], chosen["info_alpha"]))


def test_demo_settings_of_a_searched_point() -> None:
    from alphasteer_lens.experiments.config import build_config, read_toml
    from alphasteer_lens.experiments.demo import DemoConfig
    from alphasteer_lens.experiments.search_pipeline import demo_settings, toml_text

    probe = TrialParams(start=14, width=6, strength=1.25, ratio=0.4, alpha=3e-05, gate="probe",
                        eps=0.05, margin=0.25, probe_c=0.1)  # fmt: skip
    got = demo_settings(probe, layer_max=18)
    assert got == {"layers": [14, 15, 16, 17, 18], "strengths": [1.25], "ratio": 0.4,
                   "alpha": 3e-05, "gate": "probe", "calibrated_strengths": [1.25],
                   "eps": 0.05, "margin": 0.25, "probe_c": 0.1}  # fmt: skip
    score = demo_settings(TrialParams(3, 2, 0.5, 0.5, 10.0, gate="calibrated", eps=0.02), 9)
    assert score["gate"] == "score" and "probe_c" not in score
    plain = demo_settings(TrialParams(3, 2, 0.5, 0.5, 10.0), 9)
    assert set(plain) == {"layers", "strengths", "ratio", "alpha"}  # the demo keeps its gate
    text = toml_text(got, ["from trial 7"])
    assert text.startswith("# from trial 7\n")
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "demo.toml"
        path.write_text(text)
        assert read_toml(path) == got
        cfg = build_config(DemoConfig, toml=path)
        assert cfg.layers == (14, 15, 16, 17, 18) and cfg.probe_c == 0.1 and cfg.alpha == 3e-05
        assert cfg.strengths == cfg.calibrated_strengths == (1.25,)
    with pytest.raises(ValueError, match="cannot write x"):
        toml_text({"x": float("nan")}, [])
