"""Gates: the split-conformal threshold, calibrated AlphaSteer's dead zone, CAST, reports."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from alphasteer_lens.activations import cache_activations
from alphasteer_lens.alphasteer import AlphaSteer
from alphasteer_lens.gates import (
    CalibratedAlphaSteer,
    Cast,
    ConformalWarning,
    GateProbe,
    best_threshold_f1,
    condition_direction,
    conformal_rank,
    conformal_threshold,
    false_steer_rate,
    gate_histogram,
    gate_report,
)
from alphasteer_lens.generation import generate, next_token_logits
from alphasteer_lens.steering import SteeringRuntime

PROMPTS = ["Tell me a story about a fox.", "ok", "List three colours of the rainbow, please."]


def _brute_force(scores: np.ndarray, eps: float) -> float:
    """The smallest candidate τ among the scores (and +inf) such that, counting the new point
    as one more exchangeable draw, at most ε(n+1) of the n+1 points could exceed it: the
    definition of the split-conformal quantile, by enumeration."""
    n = len(scores)
    for t in sorted(scores):
        # the number of calibration scores ≤ t must be at least (1−ε)(n+1)
        if sum(s <= t for s in scores) >= (1 - eps) * (n + 1) - 1e-9:
            return float(t)
    return math.inf


@pytest.mark.parametrize("n", [1, 5, 19, 20, 49, 50, 99, 100, 101, 257])
@pytest.mark.parametrize("eps", [0.01, 0.02, 0.05, 0.1, 0.25, 0.5])
def test_conformal_threshold_matches_brute_force(n: int, eps: float) -> None:
    rng = np.random.default_rng(n * 1000 + int(eps * 100))
    scores = np.round(rng.normal(size=n), 1)  # rounding makes ties
    expected = _brute_force(scores, eps)
    got = conformal_threshold(scores, eps, too_few="ignore")
    assert got == expected
    k = math.ceil((n + 1) * (1 - eps) - 1e-9)
    assert conformal_rank(n, eps) == k
    if k <= n:
        assert got == sorted(scores)[k - 1]


def test_conformal_rank_exact_for_float_products() -> None:
    # 100 * 0.99 is 99.00000000000001 in floats; the rank is exactly 99, not 100.
    assert conformal_rank(99, 0.01) == 99
    assert conformal_rank(49, 0.02) == 49


def test_too_few_scores_policy() -> None:
    with pytest.warns(ConformalWarning, match="need at least 49"):
        assert conformal_threshold(np.zeros(10), 0.02) == math.inf
    with pytest.raises(ValueError, match="too few"):
        conformal_threshold(np.zeros(10), 0.02, too_few="raise")
    assert conformal_threshold(np.zeros(49), 0.02, too_few="raise") == 0.0
    for bad in (0.0, 1.0, -0.1, float("nan")):
        with pytest.raises(ValueError):
            conformal_threshold(np.zeros(10), bad)
    with pytest.raises(ValueError, match="NaN"):
        conformal_threshold(np.array([0.0, np.nan]), 0.5)


@pytest.mark.parametrize("dist", ["normal", "exponential", "discrete"])
def test_realised_false_steer_rate_is_at_most_eps(dist: str) -> None:
    """Exchangeable data: averaged over calibration draws, the rate on fresh draws is within
    [ε − 1/(n+1), ε] up to Monte-Carlo slack."""
    rng = np.random.default_rng(0)
    eps, n, reps, fresh = 0.05, 199, 400, 2000
    draw = {
        "normal": lambda size: rng.normal(size=size),
        "exponential": lambda size: rng.exponential(size=size),
        "discrete": lambda size: rng.integers(0, 30, size=size).astype(float),
    }[dist]
    rates = [false_steer_rate(draw(fresh), conformal_threshold(draw(n), eps)) for _ in range(reps)]
    mean = float(np.mean(rates))
    slack = 3 * 0.05 / math.sqrt(reps * n) + 0.005
    assert mean <= eps + slack
    if dist != "discrete":  # ties make it conservative
        assert mean >= eps - 1 / (n + 1) - slack


def _steer(d: int, layers: tuple[int, ...], seed: int = 0) -> AlphaSteer:
    g = torch.Generator().manual_seed(seed)
    n = len(layers)
    return AlphaSteer(
        layers=layers, w=torch.randn(n, d, generator=g), r=torch.randn(n, d, generator=g)
    )


def test_held_out_false_steer_against_brute_force_per_fold() -> None:
    """Fold k holds out ``randperm(n, seed).tensor_split(folds)[k]``: its τ is the brute-force
    conformal quantile of ``max_l h·w_l`` over the other prompts, and its rate the share of the
    held-out prompts above it; on exchangeable benign data the mean stays near ε."""
    from alphasteer_lens.gates import held_out_false_steer

    d, n, eps, folds = 5, 300, 0.1, 5
    base = _steer(d, (0, 2), seed=3)
    g = torch.Generator().manual_seed(7)
    acts = {x: torch.randn(n, d, generator=g, dtype=torch.float64) for x in (0, 2)}
    gated = CalibratedAlphaSteer(base, margin=0.25)
    table = held_out_false_steer(gated, acts, eps, folds=folds, seed=11)
    w = base.w.double().numpy()
    top = np.maximum(acts[0].numpy() @ w[0], acts[2].numpy() @ w[1])  # max_l s_l per prompt
    parts = torch.randperm(n, generator=torch.Generator().manual_seed(11)).tensor_split(folds)
    assert len(table) == folds and sorted(np.concatenate([p.numpy() for p in parts])) == list(
        range(n)
    )
    for row, held in zip(table.itertuples(), parts, strict=True):
        mask = np.zeros(n, dtype=bool)
        mask[held.numpy()] = True
        tau = _brute_force(top[~mask], eps)
        assert row.tau == pytest.approx(tau, abs=1e-12)
        assert row.false_steer_rate == pytest.approx((top[mask] > tau).mean())
        assert (row.n_calibration, row.n_held_out) == (n - mask.sum(), mask.sum())
    assert abs(table.false_steer_rate.mean() - eps) < 0.05
    with pytest.raises(ValueError, match=r"folds must be in \[2, 300\], got 1"):
        held_out_false_steer(gated, acts, eps, folds=1)


def test_calibrate_prompt_mode_uses_max_over_layers() -> None:
    base = _steer(4, (1, 3))
    s = np.random.default_rng(1).normal(size=(99, 2))
    cal = CalibratedAlphaSteer(base).calibrate({1: s[:, 0], 3: s[:, 1]}, eps=0.1)
    assert cal.tau is not None and cal.tau[0] == cal.tau[1]
    assert cal.tau[0] == conformal_threshold(s.max(1), 0.1)
    assert cal.n_calibration == 99 and cal.eps == 0.1
    lay = CalibratedAlphaSteer(base, mode="layer").calibrate(s, eps=0.1)
    assert lay.tau == (conformal_threshold(s[:, 0], 0.1), conformal_threshold(s[:, 1], 0.1))
    with pytest.raises(ValueError, match="missing layers"):
        CalibratedAlphaSteer(base).calibrate({1: s[:, 0]}, eps=0.1)


def test_gate_ramp_and_step() -> None:
    base = _steer(4, (0,))
    ramp = CalibratedAlphaSteer(base, tau=(1.0,), margin=0.5)
    m = torch.tensor([0.5, 1.0, 1.25, 1.5, 3.0], dtype=torch.float64)
    assert ramp.gate(m, 0).tolist() == [0.0, 0.0, 0.5, 1.0, 1.0]
    step = CalibratedAlphaSteer(base, tau=(1.0,), margin=0.0)
    assert step.gate(m, 0).tolist() == [0.0, 0.0, 1.0, 1.0, 1.0]


def test_runtime_delta_is_exactly_zero_below_tau_and_latches() -> None:
    """Prompt mode: a row fires from the first layer its score passes τ, and stays on."""
    d = 6
    base = _steer(d, (0, 1))
    cal = CalibratedAlphaSteer(base, tau=(0.0, 0.0), margin=0.0)
    rt = SteeringRuntime(cal, 1.0)
    rt.begin_pass(torch.arange(10, 18).reshape(2, 4))
    w0, w1 = base.w
    # row 0: below at layer 0, above at layer 1; row 1: above at layer 0, below at layer 1.
    h0 = torch.zeros(2, 4, d)
    h0[0, -1] = -w0 / w0.norm() ** 2  # score −1
    h0[1, -1] = w0 / w0.norm() ** 2  # score +1
    h1 = torch.zeros(2, 4, d)
    h1[0, -1] = 2 * w1 / w1.norm() ** 2  # +2
    h1[1, -1] = -0.5 * w1 / w1.norm() ** 2  # −0.5: below τ, but latched on by layer 0
    out0 = rt.apply("blocks.0.hook_resid_pre", h0)
    assert torch.equal(out0[0], h0[0])  # exactly untouched
    torch.testing.assert_close(out0[1], h0[1] + 1.0 * base.r[0])
    out1 = rt.apply("blocks.1.hook_resid_pre", h1)
    torch.testing.assert_close(out1[0], h1[0] + 2.0 * base.r[1])
    torch.testing.assert_close(out1[1], h1[1] - 0.5 * base.r[1])
    # decode step: the memo carries the decisions
    rt.begin_pass(torch.tensor([[1], [2]]), cached=True)
    x = torch.randn(2, 1, d)
    assert torch.equal(rt.apply("blocks.1.hook_resid_pre", x), x)  # prompt positions only


def test_uncalibrated_gate_refuses_to_run() -> None:
    rt = SteeringRuntime(CalibratedAlphaSteer(_steer(4, (0,))), 1.0)
    rt.begin_pass(torch.arange(3).reshape(1, 3))
    with pytest.raises(RuntimeError, match="calibrate"):
        rt.apply("blocks.0.hook_resid_pre", torch.zeros(1, 3, 4))


def test_below_tau_generation_is_bit_identical_to_vanilla(tiny) -> None:  # type: ignore[no-untyped-def]
    """When every layer's score is below τ, steered greedy output and logits equal vanilla's
    bit for bit; with τ = −inf and a hard step it is plain AlphaSteer."""
    d = int(tiny.cfg.d_model)
    base = _steer(d, (1, 2), seed=3)
    acts = cache_activations(tiny, PROMPTS, layers=[1, 2], progress=False)
    cal = CalibratedAlphaSteer(base, margin=0.1)
    scores = cal.layer_scores({1: acts[1], 2: acts[2]})
    above = float(scores.max()) + 1e-3  # τ above every prompt's every layer score
    gated = CalibratedAlphaSteer(base, tau=(above, above), margin=0.1)
    assert not gated.decisions({1: acts[1], 2: acts[2]}).any()
    vanilla = generate(tiny, PROMPTS, max_new_tokens=8, progress=False)
    steered = generate(tiny, PROMPTS, steering=gated, strength=50.0, max_new_tokens=8,
                       progress=False)  # fmt: skip
    assert steered == vanilla
    lv = next_token_logits(tiny, PROMPTS, progress=False)
    ls = next_token_logits(tiny, PROMPTS, steering=gated, strength=50.0, progress=False)
    assert torch.equal(lv, ls)
    # the same strength ungated changes the output: the test would catch a dead hook
    always = CalibratedAlphaSteer(base, tau=(-math.inf, -math.inf), margin=0.0)
    la = next_token_logits(tiny, PROMPTS, steering=always, strength=50.0, progress=False)
    lb = next_token_logits(tiny, PROMPTS, steering=base, strength=50.0, progress=False)
    assert torch.equal(la, lb)
    assert not torch.equal(la, lv)


def test_cast_threshold_by_f1_on_synthetic_data() -> None:
    rng = np.random.default_rng(0)
    pos = rng.normal(0.6, 0.1, 200)
    neg = rng.normal(0.2, 0.1, 300)
    theta, f1 = best_threshold_f1(pos, neg, np.round(np.arange(-1, 1.0001, 0.01), 2))
    assert 0.35 <= theta <= 0.45 and f1 > 0.95
    # brute force F1 over the same grid
    grid = np.round(np.arange(-1, 1.0001, 0.01), 2)
    best = max(
        grid,
        key=lambda t: (
            2 * (pos >= t).sum() / (2 * (pos >= t).sum() + (neg >= t).sum() + (pos < t).sum()),
            t,
        ),
    )
    assert theta == pytest.approx(best)


def test_cast_fit_and_decisions() -> None:
    g = torch.Generator().manual_seed(0)
    d = 16
    c = torch.zeros(d)
    c[0] = 1.0
    harmful = torch.randn(100, d, generator=g) + 3 * c
    benign = torch.randn(120, d, generator=g) - 3 * c
    for method in ("mean_diff", "pca"):
        v = condition_direction(harmful, benign, method=method)  # type: ignore[arg-type]
        assert float(v @ c) > 0.8
    cast = Cast.fit(harmful, benign, condition_layer=1, steer_layers=(2, 3),
                    steer_vectors=torch.ones(2, d))  # fmt: skip
    assert cast.layers == (1, 2, 3) and cast.f1 is not None and cast.f1 > 0.9
    assert cast.decide(harmful).float().mean() > 0.9 and cast.decide(benign).float().mean() < 0.1
    with pytest.raises(ValueError, match="after the first steered layer"):
        Cast(3, c, 0.0, (2,), torch.ones(1, d))
    rt = SteeringRuntime(cast, 2.0)
    rt.begin_pass(torch.arange(6).reshape(2, 3))
    h = torch.zeros(2, 3, d)
    h[0, -1] = c  # cos +1: steer
    h[1, -1] = -c  # cos −1: no
    assert torch.equal(rt.apply("blocks.1.hook_resid_pre", h), h)  # condition layer adds 0
    out = rt.apply("blocks.2.hook_resid_pre", torch.zeros(2, 3, d))
    assert torch.equal(out[0], torch.full((3, d), 2.0)) and torch.equal(out[1], torch.zeros(3, d))


def test_gate_report_and_histogram() -> None:
    d = 8
    base = _steer(d, (0, 1))
    g = torch.Generator().manual_seed(0)
    sets = {k: {0: torch.randn(n, d, generator=g), 1: torch.randn(n, d, generator=g)}
            for k, n in (("benign", 30), ("harmful", 20), ("sensitive", 10))}  # fmt: skip
    cal = CalibratedAlphaSteer(base).calibrate_activations(sets["benign"], eps=0.1)
    df = gate_report(cal, sets, {k: [f"p{i}" for i in range(len(v[0]))] for k, v in sets.items()})
    assert len(df) == 2 * 60 and set(df["set"]) == {"benign", "harmful", "sensitive"}
    b = df[(df["set"] == "benign") & (df["layer"] == 1)]
    assert b["fired_prompt"].mean() <= 0.1 + 1e-9  # in-sample: at most ε by construction
    # first_layer is the first layer with fired, −1 when none
    row = df[df["fired_prompt"]].iloc[0]
    assert row["first_layer"] in (0, 1)
    fig = gate_histogram(df)
    assert len(fig.data) == 2 * 3
    assert {"score", "gate_score", "tau", "factor", "prompt"} <= set(df.columns)
    plain = gate_report(base, {"benign": sets["benign"]})
    assert plain["fired_prompt"].all()


def test_group_calibration_bounds_every_group() -> None:
    """Mondrian calibration: τ is the largest per-group τ, so each group's rate is ≤ ε."""
    base = _steer(4, (0,))
    rng = np.random.default_rng(0)
    plain, sensitive = rng.normal(0, 0.1, 300), rng.normal(0.5, 0.2, 100)
    s = np.concatenate([plain, sensitive])[:, None]
    groups = ["plain"] * 300 + ["sensitive"] * 100
    pooled = CalibratedAlphaSteer(base).calibrate(s, eps=0.05)
    grouped = CalibratedAlphaSteer(base).calibrate(s, eps=0.05, groups=groups)
    assert grouped.tau == (
        max(conformal_threshold(plain, 0.05), conformal_threshold(sensitive, 0.05)),
    )
    assert pooled.tau is not None and grouped.tau[0] >= pooled.tau[0]
    assert false_steer_rate(sensitive, grouped.tau[0]) <= 0.05
    with pytest.raises(ValueError, match="group labels"):
        CalibratedAlphaSteer(base).calibrate(s, eps=0.05, groups=["a"])


def test_gated_generation_same_with_and_without_kv_cache(tiny) -> None:  # type: ignore[no-untyped-def]
    """Some prompts fire and some do not: decode steps (KV cache) and full re-runs agree, and
    the rows that do not fire equal vanilla."""
    d = int(tiny.cfg.d_model)
    base = _steer(d, (1, 2), seed=5)
    acts = cache_activations(tiny, PROMPTS, layers=[1, 2], progress=False)
    by = {1: acts[1], 2: acts[2]}
    m = CalibratedAlphaSteer(base).layer_scores(by).max(1).values
    lo, hi = sorted(m.tolist())[:2]
    tau = (lo + hi) / 2  # the lowest-scoring prompt stays shut, with room for rounding
    gated = CalibratedAlphaSteer(base, tau=(tau, tau), margin=0.0)
    fired = gated.decisions(by).gt(0).any(1).tolist()
    assert any(fired) and not all(fired)
    kw = {"steering": gated, "strength": 30.0, "max_new_tokens": 6, "progress": False}
    with_cache = generate(tiny, PROMPTS, use_kv_cache=True, **kw)
    without = generate(tiny, PROMPTS, use_kv_cache=False, **kw)
    assert with_cache == without
    vanilla = generate(tiny, PROMPTS, max_new_tokens=6, progress=False)
    for f, a, b in zip(fired, with_cache, vanilla, strict=True):
        if not f:
            assert a == b


def test_gate_probe_folds_standardisation_into_one_dot_product() -> None:
    """The probe's logit equals sklearn's decision function on standardised inputs (an
    independent computation), and a separable problem is separated."""
    from sklearn.linear_model import LogisticRegression

    g = torch.Generator().manual_seed(0)
    d = 8
    shift = torch.zeros(d, dtype=torch.float64)
    shift[2] = 3.0
    mal = {0: torch.randn(60, d, generator=g, dtype=torch.float64) * 2 + shift}
    ben = {0: torch.randn(90, d, generator=g, dtype=torch.float64) * 2 - shift}
    probe = GateProbe.fit(mal, ben, (0,), C=0.5)
    x = torch.cat([mal[0], ben[0]]).numpy()
    y = np.r_[np.ones(60), np.zeros(90)]
    mu, sd = x.mean(0), x.std(0) + 1e-6
    clf = LogisticRegression(C=0.5, max_iter=5000, class_weight="balanced", random_state=0)
    clf.fit((x - mu) / sd, y)
    want = clf.decision_function((x - mu) / sd)
    np.testing.assert_allclose(probe.scores(0, torch.from_numpy(x)).numpy(), want, atol=1e-8)
    acc = ((want > 0) == y).mean()
    assert acc > 0.9
    with pytest.raises(ValueError, match="C"):
        GateProbe.fit(mal, ben, (0,), C=0.0)
    with pytest.raises(ValueError, match="layer 1"):
        GateProbe.fit(mal, ben, (1,))
    with pytest.raises(ValueError, match="NaN"):
        GateProbe((0,), torch.full((1, d), math.nan), torch.zeros(1))


def test_gate_probe_saves_and_loads_bit_for_bit_and_rejects_bad_files(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A saved probe loads with the same float64 weights, C and CV table; a file for other
    layers or another width, an edited metadata field, a truncated file or a steering
    artifact in its place is a one-line ArtifactError naming the file."""
    from safetensors.torch import load_file, save_file

    from alphasteer_lens.storage import ArtifactError

    g = torch.Generator().manual_seed(2)
    d = 6
    mal = {x: torch.randn(20, d, generator=g, dtype=torch.float64) + 1 for x in (1, 3)}
    ben = {x: torch.randn(25, d, generator=g, dtype=torch.float64) - 1 for x in (1, 3)}
    probe = GateProbe.fit(mal, ben, (1, 3), C=0.3)
    path = probe.save(tmp_path / "probe.safetensors", cv_log_loss={"0.3": 0.25, "1.0": 0.5})
    got, cv = GateProbe.load(path, layers=(1, 3), d_model=d)
    assert (
        torch.equal(got.u, probe.u) and torch.equal(got.b, probe.b) and got.u.dtype == torch.float64
    )
    assert got.C == 0.3 and got.layers == (1, 3) and cv == {"0.3": 0.25, "1.0": 0.5}
    with pytest.raises(ArtifactError, match=r"probe layers \[1, 3\], expected \[1, 2\]"):
        GateProbe.load(path, layers=(1, 2), d_model=d)
    with pytest.raises(ArtifactError, match="d_model is 8"):
        GateProbe.load(path, layers=(1, 3), d_model=8)
    from alphasteer_lens.storage import read_metadata

    meta = read_metadata(path)
    edited = tmp_path / "edited.safetensors"
    save_file(load_file(str(path)), str(edited), {**meta, "C": "5.0"})
    with pytest.raises(ArtifactError, match="content hash mismatch"):
        GateProbe.load(edited, layers=(1, 3), d_model=d)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(path.read_bytes()[:-9])
    with pytest.raises(ArtifactError, match="not a readable safetensors"):
        GateProbe.load(cut, layers=(1, 3), d_model=d)
    from alphasteer_lens.artifacts import save_steering
    from alphasteer_lens.steering import ActAdd

    other = save_steering(ActAdd((1, 3), torch.ones(2, d)), tmp_path / "actadd.safetensors")
    with pytest.raises(ArtifactError, match="not a gate probe"):
        GateProbe.load(other, layers=(1, 3), d_model=d)


def test_gate_probe_select_c_by_cross_validated_log_loss() -> None:
    """``select_c`` against a by-hand k-fold: standardise on the training folds, fit, and average
    ``−mean(y log p + (1−y) log(1−p))`` on the held-out fold; the smallest mean over layers
    wins. With few prompts in high dimension the weakest regularisation overfits."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold

    g = torch.Generator().manual_seed(1)
    d, grid = 40, (0.001, 0.1, 100.0)
    shift = torch.zeros(d, dtype=torch.float64)
    shift[:3] = 0.8
    mal = {x: torch.randn(30, d, generator=g, dtype=torch.float64) + shift for x in (3, 5)}
    ben = {x: torch.randn(45, d, generator=g, dtype=torch.float64) - shift for x in (3, 5)}
    best, table = GateProbe.select_c(mal, ben, (3, 5), grid=grid, folds=3, seed=0)
    y = np.r_[np.ones(30), np.zeros(45)]
    split = StratifiedKFold(n_splits=3, shuffle=True, random_state=0)
    means = {}
    for c in grid:
        per_layer = []
        for layer in (3, 5):
            x = torch.cat([mal[layer], ben[layer]]).numpy()
            losses = []
            for tr, te in split.split(x, y):
                mu, sd = x[tr].mean(0), x[tr].std(0)
                clf = LogisticRegression(C=c, max_iter=5000, class_weight="balanced")
                clf.fit((x[tr] - mu) / sd, y[tr])
                p = np.clip(clf.predict_proba((x[te] - mu) / sd)[:, 1], 1e-15, 1 - 1e-15)
                losses.append(-np.mean(y[te] * np.log(p) + (1 - y[te]) * np.log(1 - p)))
            got = table.query("C == @c and layer == @layer").log_loss.item()
            assert got == pytest.approx(np.mean(losses), rel=1e-4)
            per_layer.append(np.mean(losses))
        means[c] = np.mean(per_layer)
    assert best == min(means, key=lambda c: means[c]) and best != 100.0
    with pytest.raises(ValueError, match="grid"):
        GateProbe.select_c(mal, ben, (3,), grid=(0.0, 1.0))
    with pytest.raises(ValueError, match="5 folds need at least 5 prompts per side"):
        GateProbe.select_c({3: mal[3][:4]}, ben, (3,), folds=5)
    with pytest.raises(ValueError, match="layer 4"):
        GateProbe.select_c(mal, ben, (4,))


def test_probe_gate_decides_on_the_probe_and_steers_with_alphasteer() -> None:
    """With a probe the gate reads the probe's logit (not s = h·w), calibrates τ on probe
    logits, and the added steering is still s·r."""
    d = 6
    base = _steer(d, (0,), seed=2)
    w = base.w[0].double()
    u = torch.zeros(1, d, dtype=torch.float64)
    u[0, 0] = 1.0  # the probe reads coordinate 0 only
    probe = GateProbe((0,), u, torch.tensor([-1.0], dtype=torch.float64))
    cal_h = torch.randn(200, d, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    gated = CalibratedAlphaSteer(base, margin=0.0, probe=probe).calibrate_activations(
        {0: cal_h}, eps=0.1
    )
    assert gated.tau is not None
    assert gated.tau[0] == conformal_threshold(cal_h[:, 0] - 1.0, 0.1)
    # row 0: probe high, row 1: probe low; both with s = h·w of the same size
    h = torch.zeros(2, 3, d)
    h[0, -1, 0] = 50.0
    h[1, -1, 0] = -50.0
    h[:, -1] += (5 * w / w.norm() ** 2).float()
    s = (h[:, -1].double() @ w).float()
    torch.testing.assert_close(
        gated.decisions({0: h[:, -1].double()}), torch.tensor([[1.0], [0.0]], dtype=torch.float64)
    )
    rt = SteeringRuntime(gated, 1.0)
    rt.begin_pass(torch.arange(6).reshape(2, 3))
    out = rt.apply("blocks.0.hook_resid_pre", h)
    torch.testing.assert_close(out[0], h[0] + s[0] * base.r[0])
    assert torch.equal(out[1], h[1])
    with pytest.raises(ValueError, match="probe layers"):
        CalibratedAlphaSteer(_steer(d, (1,)), probe=probe)
    with pytest.raises(ValueError, match="not both"):
        CalibratedAlphaSteer(base, probe=probe, scale=(2.0,))


def test_cache_last_plus_mean_is_last_and_mean_of_one_pass(tiny) -> None:  # type: ignore[no-untyped-def]
    """``positions="last+mean"`` holds ``[n, 2, d]``: the "last" cache and the "mean" cache of
    the same prompts side by side, and the prompt mean is the masked mean by hand."""
    both = cache_activations(tiny, PROMPTS, layers=[1], positions="last+mean", progress=False)
    last = cache_activations(tiny, PROMPTS, layers=[1], positions="last", progress=False)
    mean = cache_activations(tiny, PROMPTS, layers=[1], positions="mean", progress=False)
    full = cache_activations(tiny, PROMPTS, layers=[1], positions="prompt", progress=False)
    assert both[1].shape == (len(PROMPTS), 2, tiny.cfg.d_model)
    torch.testing.assert_close(both[1][:, 0], last[1])
    torch.testing.assert_close(both[1][:, 1], mean[1])
    m = full.attention_mask
    assert m is not None
    by_hand = torch.stack([full[1][i, m[i].bool()].mean(0) for i in range(len(PROMPTS))])
    torch.testing.assert_close(both[1][:, 1], by_hand, atol=1e-5, rtol=1e-5)


def test_pass_state_prompt_mean_skips_padding_and_needs_the_prefill() -> None:
    """The runtime's prompt mean over a left-padded prefill equals the mean of each row's real
    columns; a decode step (which holds one column) cannot give it."""
    from alphasteer_lens.passes import PassState, prompt_bounds

    tokens = torch.arange(10).reshape(2, 5)
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    h = torch.randn(2, 5, 3, generator=torch.Generator().manual_seed(0))
    state = PassState("prefill", 0, 5, prompt_bounds(tokens, mask))
    torch.testing.assert_close(state.prompt_mean(h), torch.stack([h[0, 2:].mean(0), h[1].mean(0)]))
    decode = PassState("decode", 5, 1, state.prompt)
    with pytest.raises(RuntimeError, match="whole prompt"):
        decode.prompt_mean(h[:, :1])


def test_gate_probe_last_plus_mean_fit_load_and_shapes(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A ``"last+mean"`` probe equals sklearn's decision function on the two readings side by
    side (an independent computation); a class signal only in the prompt mean is found there;
    it saves and loads with ``u_mean``; it refuses last-token-only activations."""
    from sklearn.linear_model import LogisticRegression

    g = torch.Generator().manual_seed(3)
    d = 5
    shift = torch.zeros(2, d, dtype=torch.float64)
    shift[1, 0] = 2.5  # the classes differ in the mean reading only
    mal = {4: torch.randn(70, 2, d, generator=g, dtype=torch.float64) + shift}
    ben = {4: torch.randn(80, 2, d, generator=g, dtype=torch.float64) - shift}
    probe = GateProbe.fit(mal, ben, (4,), C=0.7, reads="last+mean")
    assert probe.reads == "last+mean" and probe.u_mean is not None
    x = torch.cat([mal[4], ben[4]]).reshape(150, 2 * d).numpy()
    y = np.r_[np.ones(70), np.zeros(80)]
    mu, sd = x.mean(0), x.std(0) + 1e-6
    clf = LogisticRegression(C=0.7, max_iter=5000, class_weight="balanced", random_state=0)
    want = clf.fit((x - mu) / sd, y).decision_function((x - mu) / sd)
    got = probe.scores(0, torch.cat([mal[4], ben[4]]))
    np.testing.assert_allclose(got.numpy(), want, atol=1e-8)
    assert probe.u_mean[0].abs().argmax() == 0 and probe.u_mean[0, 0] > probe.u[0].abs().max()
    # a last-token probe of the same data reads [:, 0] and cannot separate it
    last = GateProbe.fit(mal, ben, (4,), C=0.7)
    assert last.reads == "last" and last.u_mean is None
    flat = last.scores(0, torch.cat([mal[4], ben[4]])).numpy()
    assert ((flat > 0) == y).mean() < 0.75 < ((got.numpy() > 0) == y).mean()
    path = probe.save(tmp_path / "probe.safetensors")
    back, _ = GateProbe.load(path, layers=(4,), d_model=d)
    assert back.reads == "last+mean" and torch.equal(back.u_mean, probe.u_mean)
    with pytest.raises(ValueError, match="positions='last\\+mean'.*got shape \\(70, 5\\)"):
        GateProbe.fit({4: mal[4][:, 0]}, {4: ben[4][:, 0]}, (4,), reads="last+mean")
    with pytest.raises(ValueError, match="positions='last\\+mean'"):
        probe.scores(0, mal[4][:, 0])
    with pytest.raises(ValueError, match="reads must be"):
        GateProbe.fit(mal, ben, (4,), reads="mean")  # type: ignore[arg-type]


def test_last_plus_mean_gate_at_run_time_matches_the_cached_decisions(tiny) -> None:  # type: ignore[no-untyped-def]
    """A gate that reads only the prompt mean: τ between the prompts' cached mean scores opens
    for some prompts and not others; at run time the shut ones generate exactly vanilla's
    answer and logits and the open ones are steered, so the hook's prompt mean is the cache's."""
    d = int(tiny.cfg.d_model)
    base = _steer(d, (1, 2), seed=7)
    acts = cache_activations(tiny, PROMPTS, layers=[1, 2], positions="last+mean", progress=False)
    by = {1: acts[1].double(), 2: acts[2].double()}
    v = torch.randn(2, d, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    probe = GateProbe((1, 2), torch.zeros(2, d, dtype=torch.float64), torch.zeros(2), u_mean=v)
    m = CalibratedAlphaSteer(base, probe=probe).layer_scores(by).max(1).values
    torch.testing.assert_close(m, torch.maximum(by[1][:, 1] @ v[0], by[2][:, 1] @ v[1]))
    lo, hi = sorted(m.tolist())[:2]
    tau = (lo + hi) / 2
    gated = CalibratedAlphaSteer(base, tau=(tau, tau), margin=0.0, probe=probe)
    fired = gated.decisions(by).gt(0).any(1).tolist()
    assert any(fired) and not all(fired)
    vanilla = next_token_logits(tiny, PROMPTS, progress=False)
    steered = next_token_logits(tiny, PROMPTS, steering=gated, strength=30.0, progress=False)
    for i, f in enumerate(fired):
        assert torch.equal(steered[i], vanilla[i]) != f
    kw = {"steering": gated, "strength": 30.0, "max_new_tokens": 6, "progress": False}
    assert generate(tiny, PROMPTS, use_kv_cache=True, **kw) == generate(
        tiny, PROMPTS, use_kv_cache=False, **kw
    )


def test_gated_actadd_adds_the_refusal_direction_behind_the_same_gate(tiny) -> None:  # type: ignore[no-untyped-def]
    """``steer="actadd"``: the same calibrated gate, but an open prompt gets ActAdd of the
    refusal directions (``λ·r_l``) instead of AlphaSteer's ``λ·s_l·r_l``: its logits are
    ActAdd's, a shut prompt's are vanilla's, and the fired set is the AlphaSteer gate's."""
    from dataclasses import replace

    from alphasteer_lens.steering import ActAdd

    d = int(tiny.cfg.d_model)
    base = _steer(d, (1, 2), seed=3)
    acts = cache_activations(tiny, PROMPTS, layers=[1, 2], progress=False)
    by = {1: acts[1].double(), 2: acts[2].double()}
    m = CalibratedAlphaSteer(base).layer_scores(by).max(1).values
    tau = sum(sorted(m.tolist())[:2]) / 2
    gated = CalibratedAlphaSteer(base, tau=(tau, tau), margin=0.0)
    as_actadd = replace(gated, steer="actadd")
    open_at = as_actadd.decisions(by).gt(0)  # [prompt, layer]: open from its first firing on
    assert torch.equal(open_at, gated.decisions(by).gt(0))
    fired = open_at.any(1).tolist()
    assert any(fired) and not all(fired)
    kw = {"strength": 4.0, "progress": False}
    vanilla = next_token_logits(tiny, PROMPTS, progress=False)
    alpha = next_token_logits(tiny, PROMPTS, steering=gated, **kw)
    got = next_token_logits(tiny, PROMPTS, steering=as_actadd, **kw)
    for i, f in enumerate(fired):
        assert torch.equal(got[i], vanilla[i]) != f
        if f:  # ActAdd at the layers this prompt's gate is open at
            rows = open_at[i].nonzero().flatten().tolist()
            plain = ActAdd(tuple((1, 2)[j] for j in rows), base.r[rows])
            actadd = next_token_logits(tiny, PROMPTS, steering=plain, **kw)
            torch.testing.assert_close(got[i], actadd[i])
            assert not torch.allclose(got[i], alpha[i])  # not AlphaSteer's s·r
    with pytest.raises(ValueError, match="steer must be 'alphasteer' or 'actadd', got 'cast'"):
        replace(gated, steer="cast")


def test_mean_reading_gate_on_right_padded_tokens_skips_the_pad_run() -> None:
    """TransformerLens pads on the right and passes no mask: a gate that reads the prompt mean
    must average each row over its own tokens only. Row 1's pad columns are set so that their
    mean score is far above τ: counted, they would open its gate; skipped, it stays shut and its
    activations come back bit-identical while row 0 gets ``s·r``."""
    from alphasteer_lens.steering import SteeringRuntime

    d, pad = 6, 0
    base = _steer(d, (0,), seed=11)
    tokens = torch.tensor([[5, 6, 7, 8], [5, 6, pad, pad]])
    g = torch.Generator().manual_seed(12)
    h = torch.randn(2, 4, d, generator=g)
    v = torch.randn(1, d, generator=g, dtype=torch.float64)
    means = torch.stack([h[0].mean(0), h[1, :2].mean(0)]).double()
    if means[0] @ v[0] < means[1] @ v[0]:
        v = -v  # row 0 scores higher
    m = means @ v[0]
    h[1, 2:] = (1e3 * v[0] / v[0].norm()).float()  # pad run: a huge score if it were averaged
    probe = GateProbe((0,), torch.zeros(1, d, dtype=torch.float64), torch.zeros(1), u_mean=v)
    tau = float(m.mean())
    gated = CalibratedAlphaSteer(base, tau=(tau,), margin=0.0, probe=probe)
    rt = SteeringRuntime(gated, 1.0, pad_id=pad, padding_side="right")
    rt.begin_pass(tokens, None)
    out = rt.apply("blocks.0.hook_resid_pre", h.clone())
    assert torch.equal(out[1], h[1])  # shut: the pad run was not averaged in
    s = h[0, -1] @ base.w[0]
    torch.testing.assert_close(out[0], h[0] + s * base.r[0])
