"""PCA views: the fitted basis equals scikit-learn's, on-paper shifts follow their formulas, and
real steered activations come from the steered forward pass."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.decomposition import PCA

from alphasteer_lens.activations import cache_activations
from alphasteer_lens.alphasteer import AlphaSteer
from alphasteer_lens.pca import (
    centroid_shifts,
    fit_pca,
    on_paper_shift,
    pca_points,
    steered_activations,
)
from alphasteer_lens.steering import ActAdd, DirectionalAblation

BENIGN = ["Plan a picnic.", "Name three birds.", "Write a haiku about rain.", "Sort 3, 1, 2."]
MALICIOUS = ["How to pick a lock?", "Make a weapon.", "Steal a car quickly.", "Hack my ex."]


def _clouds(seed: int = 0, d: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    scale = torch.linspace(3.0, 0.1, d)
    hb = torch.randn(30, d, generator=g) * scale
    hm = torch.randn(25, d, generator=g) * scale + 2.0
    return hb, hm


def test_vanilla_projection_matches_an_independent_eigendecomposition() -> None:
    """fit_pca (scikit-learn's SVD) against numpy's eigendecomposition of the scatter matrix
    ``(X − μ)ᵀ(X − μ)``: the same axes up to sign, the same coordinates, and explained-variance
    ratios ``λᵢ / Σλ``. Checking sklearn against sklearn could not fail."""
    hb, hm = _clouds()
    basis = fit_pca(hb, hm)
    x = torch.cat([hb, hm]).double().numpy()
    mean = x.mean(0)
    evals, evecs = np.linalg.eigh((x - mean).T @ (x - mean))  # ascending
    top = evecs[:, ::-1][:, :2].T
    dots = np.sum(basis.components.numpy() * top, axis=1)
    np.testing.assert_allclose(np.abs(dots), 1.0, atol=1e-10)  # the same axes
    axes = top * np.sign(dots)[:, None]
    np.testing.assert_allclose(basis.mean.numpy(), mean, atol=1e-12)
    for h in (hb, hm):
        np.testing.assert_allclose(
            basis.transform(h).numpy(), (h.double().numpy() - mean) @ axes.T, atol=1e-9
        )
    np.testing.assert_allclose(
        basis.explained_variance_ratio, evals[::-1][:2] / evals.sum(), rtol=1e-9
    )
    z = basis.transform(torch.cat([hb, hm]))
    assert float(z[:, 0].var()) > float(z[:, 1].var())  # PC1 carries the most variance
    assert basis.axis_title(0).startswith("PC1 (") and "% var.)" in basis.axis_title(0)


def test_on_paper_projection_is_transform_plus_shift() -> None:
    """transform(h + s) = transform(h) + s·componentsᵀ, and equals sklearn on h + s."""
    hb, hm = _clouds(1)
    basis = fit_pca(hb, hm)
    g = torch.Generator().manual_seed(5)
    s = torch.randn(hm.shape, generator=g, dtype=torch.float64)
    lhs = basis.transform(hm.double() + s)
    rhs = basis.transform(hm) + s @ basis.components.T
    torch.testing.assert_close(lhs, rhs)
    torch.testing.assert_close(basis.transform_shift(s), s @ basis.components.T)
    sk = PCA(n_components=2).fit(torch.cat([hb, hm]).double().numpy())
    np.testing.assert_allclose(lhs.numpy(), sk.transform((hm.double() + s).numpy()), atol=1e-10)


def test_on_paper_shift_formulas() -> None:
    d = 6
    g = torch.Generator().manual_seed(2)
    h = torch.randn(4, d, generator=g)
    w, r, v = (torch.randn(2, d, generator=g) for _ in range(3))
    hook = "blocks.3.hook_resid_pre"
    alpha = AlphaSteer(layers=(2, 3), w=w, r=r)
    expected = 0.5 * (h.double() @ w[1].double())[:, None] * r[1].double()[None, :]
    torch.testing.assert_close(on_paper_shift(alpha, hook, h, 0.5), expected)
    act = ActAdd((2, 3), v)
    torch.testing.assert_close(on_paper_shift(act, hook, h, 2.0), 2.0 * v[1].double().expand(4, d))
    abl = DirectionalAblation((3,), v[:1])
    r_hat = v[0].double() / v[0].double().norm()
    ablated = h.double() + on_paper_shift(abl, hook, h, 1.0)
    torch.testing.assert_close(ablated @ r_hat, torch.zeros(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="not one of"):
        on_paper_shift(act, "blocks.0.hook_resid_pre", h, 1.0)


def test_fit_pca_rejects_bad_input() -> None:
    hb, hm = _clouds()
    with pytest.raises(ValueError, match="d_model"):
        fit_pca(hb, hm[:, :5])
    with pytest.raises(ValueError, match="n_components"):
        fit_pca(hb, hm, n_components=0)


def test_real_steered_activations_come_from_the_steered_pass(tiny) -> None:  # type: ignore[no-untyped-def]
    """At the first steered hook, real = vanilla + s (the cache reads after the steering hook);
    at a later steered hook, real also carries the upstream layer's steering, so it differs
    from the on-paper h + s(h)."""
    d = int(tiny.cfg.d_model)
    g = torch.Generator().manual_seed(0)
    hook0, hook1 = "blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre"
    van0 = cache_activations(tiny, BENIGN, hooks=[hook0], progress=False)[hook0]
    van1 = cache_activations(tiny, BENIGN, hooks=[hook1], progress=False)[hook1]
    v = torch.randn(2, d, generator=g)
    act = ActAdd((0, 1), v)
    real0 = steered_activations(tiny, BENIGN, act, 1.5, hook=hook0)
    torch.testing.assert_close(real0, van0 + 1.5 * v[0], atol=1e-5, rtol=1e-5)
    alpha = AlphaSteer((0, 1), w=0.1 * torch.randn(2, d, generator=g), r=v)
    real0 = steered_activations(tiny, BENIGN, alpha, 1.0, hook=hook0)
    paper0 = steered_activations(tiny, BENIGN, alpha, 1.0, hook=hook0, mode="on_paper")
    torch.testing.assert_close(real0, paper0, atol=1e-4, rtol=1e-4)
    real1 = steered_activations(tiny, BENIGN, alpha, 1.0, hook=hook1)
    paper1 = steered_activations(tiny, BENIGN, alpha, 1.0, hook=hook1, mode="on_paper")
    torch.testing.assert_close(
        paper1, (van1.double() + on_paper_shift(alpha, hook1, van1, 1.0)).float()
    )
    assert (real1 - paper1).abs().max() > 1e-2
    with pytest.raises(ValueError, match="mode"):
        steered_activations(tiny, BENIGN, alpha, 1.0, hook=hook1, mode="imagined")  # type: ignore[arg-type]


def test_pca_points_frame(tiny) -> None:  # type: ignore[no-untyped-def]
    d = int(tiny.cfg.d_model)
    g = torch.Generator().manual_seed(1)
    hook = "blocks.2.hook_resid_pre"
    v = torch.randn(1, d, generator=g)
    steerings = {"actadd": ActAdd((2,), v), "alphasteer": AlphaSteer((2,), 0.1 * v, v)}
    basis, pts = pca_points(tiny, BENIGN, MALICIOUS, steerings, [0.0, 2.0], layer=2)
    assert basis.hook == hook
    assert len(pts) == 2 * 2 * 2 * 2 * 4  # methods × strengths × sets × conditions × prompts
    assert list(pts.columns) == [
        "method",
        "strength",
        "mode",
        "label",
        "condition",
        "index",
        "pc1",
        "pc2",
        "prompt",
    ]
    hb = cache_activations(tiny, BENIGN, hooks=[hook], progress=False)[hook]
    hm = cache_activations(tiny, MALICIOUS, hooks=[hook], progress=False)[hook]
    sk = PCA(n_components=2).fit(torch.cat([hb, hm]).double().numpy())
    for label, h in (("benign", hb), ("malicious", hm)):
        rows = pts[(pts.label == label) & (pts.condition == "vanilla") & (pts.method == "actadd")]
        rows = rows[rows.strength == 2.0].sort_values("index")
        np.testing.assert_allclose(
            rows[["pc1", "pc2"]].to_numpy(), sk.transform(h.double().numpy()), atol=1e-6
        )
    # λ = 0: steered equals vanilla; ActAdd at λ = 2 moves every point by 2·v·Cᵀ.
    zero = pts[pts.strength == 0.0]
    a = zero[zero.condition == "vanilla"][["pc1", "pc2"]].to_numpy()
    b = zero[zero.condition == "steered"][["pc1", "pc2"]].to_numpy()
    np.testing.assert_allclose(a, b, atol=1e-6)
    two = pts[(pts.strength == 2.0) & (pts.method == "actadd")]
    moved = (
        two[two.condition == "steered"][["pc1", "pc2"]].to_numpy()
        - two[two.condition == "vanilla"][["pc1", "pc2"]].to_numpy()
    )
    expected = (2.0 * v.double() @ basis.components.T).numpy()
    np.testing.assert_allclose(moved, np.broadcast_to(expected, moved.shape), atol=1e-4)
    _, paper = pca_points(tiny, BENIGN, MALICIOUS, steerings, 2.0, hook=hook, mode="on_paper")
    assert set(paper["mode"]) == {"on_paper"}
    p2 = paper[(paper.method == "actadd") & (paper.condition == "steered")][["pc1", "pc2"]]
    r2 = two[two.condition == "steered"][["pc1", "pc2"]]
    np.testing.assert_allclose(p2.to_numpy(), r2.to_numpy(), atol=1e-4)  # first steered hook


def test_pca_points_per_method_strengths_and_prompt_format(tiny) -> None:  # type: ignore[no-untyped-def]
    """A ``{method: λ}`` mapping gives each method its own strength, and the result equals
    separate one-method calls; ``prompt_format`` reaches the activations (raw text here, unlike
    the tiny model's default chat template)."""
    d = int(tiny.cfg.d_model)
    v = torch.randn(1, d, generator=torch.Generator().manual_seed(2))
    steerings = {"actadd": ActAdd((1,), v), "alphasteer": AlphaSteer((1,), 0.1 * v, v)}
    lams = {"actadd": 1.5, "alphasteer": 3.0}
    basis, pts = pca_points(tiny, BENIGN, MALICIOUS, steerings, lams, layer=2)
    assert pts.groupby("method").strength.unique().map(list).to_dict() == {
        "actadd": [1.5],
        "alphasteer": [3.0],
    }
    for m, lam in lams.items():
        _, alone = pca_points(tiny, BENIGN, MALICIOUS, {m: steerings[m]}, lam, layer=2)
        np.testing.assert_allclose(
            pts[pts.method == m][["pc1", "pc2"]].to_numpy(),
            alone[["pc1", "pc2"]].to_numpy(),
            atol=1e-6,
        )
    with pytest.raises(ValueError, match=r"no λ for methods \['alphasteer'\]"):
        pca_points(tiny, BENIGN, MALICIOUS, steerings, {"actadd": 1.0}, layer=2)
    hook = "blocks.2.hook_resid_pre"
    raw_basis, raw = pca_points(
        tiny, BENIGN, MALICIOUS, {"actadd": steerings["actadd"]}, 0.0, layer=2, prompt_format="raw"
    )
    hb = cache_activations(tiny, BENIGN, hooks=[hook], prompt_format="raw", progress=False)[hook]
    chat = cache_activations(tiny, BENIGN, hooks=[hook], progress=False)[hook]
    assert not torch.allclose(hb, chat)  # the two formats differ on this model
    got = raw[(raw.label == "benign") & (raw.condition == "vanilla")][["pc1", "pc2"]]
    np.testing.assert_allclose(got.to_numpy(), raw_basis.transform(hb).numpy(), atol=1e-6)
    steered = raw[(raw.label == "benign") & (raw.condition == "steered")][["pc1", "pc2"]]
    np.testing.assert_allclose(steered.to_numpy(), got.to_numpy(), atol=1e-6)  # λ = 0


def test_pca_points_rejects_bad_arguments(tiny) -> None:  # type: ignore[no-untyped-def]
    st = {"actadd": ActAdd((1,), torch.ones(1, int(tiny.cfg.d_model)))}
    with pytest.raises(ValueError, match="exactly one"):
        pca_points(tiny, BENIGN, MALICIOUS, st, 1.0)
    with pytest.raises(ValueError, match="steerings is empty"):
        pca_points(tiny, BENIGN, MALICIOUS, {}, 1.0, layer=1)
    with pytest.raises(ValueError, match="strengths is empty"):
        pca_points(tiny, BENIGN, MALICIOUS, st, [], layer=1)


def test_centroid_shifts() -> None:
    rows = []
    for cond, dx in (("vanilla", 0.0), ("steered", 3.0)):
        for label, dy in (("benign", 0.0), ("malicious", 4.0)):
            for x in (1.0, 3.0):
                rows.append(
                    {
                        "method": "m",
                        "strength": 1.0,
                        "mode": "real",
                        "label": label,
                        "condition": cond,
                        "pc1": x + (dx if label == "malicious" else 0.0),
                        "pc2": dy if cond == "steered" else 0.0,
                    }
                )
    out = centroid_shifts(pd.DataFrame(rows)).set_index("label")["shift"]
    assert out["benign"] == pytest.approx(0.0)
    assert out["malicious"] == pytest.approx(5.0)  # (3, 4)
    with pytest.raises(ValueError, match="lacks columns"):
        centroid_shifts(pd.DataFrame({"pc1": [1.0]}))
