"""Figures: what they draw matches their data, two builds are identical, and saving works
(HTML always; PNG where a browser is installed, required when ALPHASTEER_LENS_REQUIRE_PNG=1)."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest
import torch
from scipy.stats import gaussian_kde as scipy_kde

from alphasteer_lens import viz
from alphasteer_lens.pca import fit_pca
from alphasteer_lens.viz import (
    confidence_ellipse,
    gaussian_kde,
    layer_sweep_figure,
    pca_figure,
    save_figure,
    strength_figure,
    tradeoff_figure,
)


def _points(seed: int = 0, n: int = 12) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for method in ("actadd", "alphasteer"):
        for lam in (0.0, 1.0):
            for label, centre in (("benign", (0.0, 0.0)), ("malicious", (3.0, 1.0))):
                base = rng.normal(centre, 1.0, (n, 2))
                for cond in ("vanilla", "steered"):
                    shift = lam * (2.0 if (label == "malicious" or method == "actadd") else 0.0)
                    z = base + (shift if cond == "steered" else 0.0)
                    for i, (x, y) in enumerate(z):
                        rows.append(
                            {
                                "method": method,
                                "strength": lam,
                                "mode": "real",
                                "label": label,
                                "condition": cond,
                                "index": i,
                                "pc1": x,
                                "pc2": y,
                                "prompt": f"{label} prompt {i}",
                            }
                        )
    return pd.DataFrame(rows)


def _sweep(mode: str = "logit") -> pd.DataFrame:
    layers = np.arange(6)
    df = pd.DataFrame(
        {
            "layer": layers,
            "mode": mode,
            "strength": 2.0,
            "auroc": [np.nan, 0.7, 0.9, 0.95, 0.8, 0.75],
            "harmful_score": [-3.0, -2.5, -1.0, -0.5, -2.0, -2.8],
            "benign_score": [-4.0, -3.9, -3.0, -2.5, -3.5, -3.8],
            "harmful_refusal": [0.0, 0.0, 0.2, 0.4, 0.1, 0.0],
            "benign_refusal": [0.0, 0.0, 0.1, 0.1, 0.0, 0.0],
            "benign_kl": [0.0, 0.1, 0.5, 1.0, 0.7, 0.3],
        }
    )
    df.attrs["vanilla"] = {"harmful_score": -3.0, "benign_score": -4.0}
    return df


def _tradeoff() -> pd.DataFrame:
    rows = []
    for method, slope in (("alphasteer", 0.2), ("actadd", 1.0)):
        for lam in (0.0, 0.5, 1.0):
            rows.append(
                {
                    "method": method,
                    "mode": "generation",
                    "strength": lam,
                    "harmful_refusal": 0.4 * lam,
                    "benign_kl": slope * lam,
                    "benign_refusal": 0.3 * slope * lam,
                }
            )
    df = pd.DataFrame(rows)
    df.attrs["vanilla"] = {"harmful_refusal": 0.0, "benign_kl": 0.0, "benign_refusal": 0.0}
    return df


def _scatter(fig: go.Figure, name: str, xaxis: str) -> go.Scatter:
    (trace,) = [t for t in fig.data if t.name == name and t.mode == "markers" and t.xaxis == xaxis]
    return trace


def test_confidence_ellipse_is_the_mahalanobis_contour() -> None:
    rng = np.random.default_rng(0)
    xy = rng.multivariate_normal([1.0, -2.0], [[2.0, 0.8], [0.8, 1.0]], 200)
    ell = confidence_ellipse(xy)
    d = ell - xy.mean(0)
    m2 = np.einsum("ni,ij,nj->n", d, np.linalg.inv(np.cov(xy, rowvar=False)), d)
    np.testing.assert_allclose(m2, -2 * np.log(0.05), rtol=1e-9)
    with pytest.raises(ValueError, match="at least 3"):
        confidence_ellipse(xy[:2])


def test_gaussian_kde_equals_scipy() -> None:
    rng = np.random.default_rng(1)
    v = rng.normal(0, 2, 50)
    grid = np.linspace(-8, 8, 101)
    np.testing.assert_allclose(gaussian_kde(v, grid), scipy_kde(v)(grid), rtol=1e-10)


def test_pca_figure_draws_the_points() -> None:
    pts = _points()
    hb = torch.randn(10, 5, generator=torch.Generator().manual_seed(0))
    basis = fit_pca(hb, hb + 1.0, hook="blocks.7.hook_resid_pre")
    fig = pca_figure(pts, basis=basis, strength=1.0, methods=["actadd", "alphasteer"])
    titles = [a.text for a in fig.layout.annotations]
    assert "ActAdd, λ = 1" in titles and "AlphaSteer, λ = 1" in titles
    assert "blocks.7.hook_resid_pre" in fig.layout.title.text
    assert fig.layout.xaxis5.title.text == basis.axis_title(0)
    assert fig.layout.yaxis5.title.text == basis.axis_title(1)
    # Scatter panels are x5 (ActAdd) and x7 (AlphaSteer); marginals above (x1, x3) and right.
    for xaxis, method in (("x5", "actadd"), ("x7", "alphasteer")):
        for label in ("benign", "malicious"):
            for cond in ("vanilla", "steered"):
                trace = _scatter(fig, f"{label}, {cond}", xaxis)
                part = pts[
                    (pts.method == method)
                    & (pts.strength == 1.0)
                    & (pts.label == label)
                    & (pts.condition == cond)
                ]
                np.testing.assert_array_equal(trace.x, part.pc1.to_numpy())
                np.testing.assert_array_equal(trace.y, part.pc2.to_numpy())
    assert fig.layout.xaxis5.range == fig.layout.xaxis7.range
    assert sum(t.showlegend is not False for t in fig.data if t.mode == "markers") == 4
    with pytest.raises(ValueError, match="pass strength="):
        pca_figure(pts)
    with pytest.raises(ValueError, match="not in points"):
        pca_figure(pts, strength=1.0, methods=["nope"])
    with pytest.raises(ValueError, match="needs columns"):
        pca_figure(pts.drop(columns=["pc2"]), strength=1.0)


def test_pca_figure_draws_each_method_at_its_own_strength() -> None:
    pts = _points()
    own = pts[((pts.method == "actadd") & (pts.strength == 0.0)) | (
        (pts.method == "alphasteer") & (pts.strength == 1.0))]  # fmt: skip
    fig = pca_figure(own, methods=["actadd", "alphasteer"])
    titles = [a.text for a in fig.layout.annotations]
    assert "ActAdd, λ = 0" in titles and "AlphaSteer, λ = 1" in titles
    trace = _scatter(fig, "malicious, steered", "x7")  # AlphaSteer's panel, its λ = 1 points
    part = own[(own.method == "alphasteer") & (own.label == "malicious")]
    np.testing.assert_array_equal(trace.x, part[part.condition == "steered"].pc1.to_numpy())
    with pytest.raises(ValueError, match="pass strength="):
        pca_figure(pts)  # a method with two strengths still needs strength=


def test_figures_are_identical_across_builds() -> None:
    builds = [
        (
            pca_figure(_points(), strength=0.0),
            strength_figure(_points()),
            layer_sweep_figure(_sweep()),
            tradeoff_figure(_tradeoff()),
        )
        for _ in range(2)
    ]
    for a, b in zip(*builds, strict=True):
        assert a.to_json() == b.to_json()


def test_strength_figure_panels() -> None:
    fig = strength_figure(_points(), methods=["alphasteer", "actadd"])
    titles = [a.text for a in fig.layout.annotations]
    assert titles == [
        "AlphaSteer, λ = 0",
        "AlphaSteer, λ = 1",
        "ActAdd, λ = 0",
        "ActAdd, λ = 1",
    ]
    trace = _scatter(fig, "malicious, steered", "x2")  # AlphaSteer, λ = 1
    pts = _points()
    part = pts[
        (pts.method == "alphasteer")
        & (pts.strength == 1.0)
        & (pts.label == "malicious")
        & (pts.condition == "steered")
    ]
    np.testing.assert_array_equal(trace.x, part.pc1.to_numpy())


def test_layer_sweep_figure_marks_the_best_layers() -> None:
    fig = layer_sweep_figure(_sweep())
    texts = [a.text for a in fig.layout.annotations]
    assert "best AUROC: layer 3" in texts
    assert "most induced refusal: layer 3" in texts
    assert any("λ = 2" in t for t in texts)
    (harm,) = [t for t in fig.data if t.name == "harmful prompts"]
    np.testing.assert_array_equal(harm.y, _sweep().harmful_score.to_numpy())
    assert fig.layout.xaxis3.title.text.startswith("layer")
    gen = _sweep("generation").assign(
        harmful_refusal_gen=[0.0, 0.0, 0.1, 0.3, 0.0, 0.0], benign_refusal_gen=0.0
    )
    fig4 = layer_sweep_figure(_sweep(), generation=gen)
    assert any(t.name == "harmful prompts (greedy answers)" for t in fig4.data)
    assert fig4.layout.xaxis4.title.text.startswith("layer")


def test_tradeoff_figure_labels_every_point() -> None:
    fig = tradeoff_figure(_tradeoff())
    alpha = [t for t in fig.data if t.name == "AlphaSteer" and t.xaxis == "x"]
    assert list(alpha[0].text) == ["λ=0", "λ=0.5", "λ=1"]
    assert list(alpha[0].x) == [0.0, 0.1, 0.2]
    assert any(t.name == "vanilla" for t in fig.data)
    assert fig.layout.xaxis.title.text == viz.LABELS["benign_kl"]
    assert fig.layout.yaxis.title.text == viz.LABELS["harmful_refusal"]
    grid = tradeoff_figure(_tradeoff(), ys=("harmful_refusal", "benign_refusal"))
    (lower_left,) = [t for t in grid.data if t.name == "ActAdd" and t.xaxis == "x3"]
    assert list(lower_left.y) == [0.0, 0.15, 0.3] and list(lower_left.x) == [0.0, 0.5, 1.0]
    assert sum(t.showlegend is not False for t in grid.data) == 3  # two methods + vanilla


def test_save_figure_html_is_deterministic(tmp_path: Path) -> None:
    fig = tradeoff_figure(_tradeoff())
    (html,) = save_figure(fig, tmp_path / "a" / "fig", png=False)
    first = html.read_bytes()
    save_figure(tradeoff_figure(_tradeoff()), tmp_path / "a" / "fig.html", png=False)
    assert html.name == "fig.html" and html.read_bytes() == first
    assert b'id="fig-fig"' in first and b"plotly" in first


def test_save_figure_png_needs_a_browser(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(viz, "browser_path", lambda: None)
    with pytest.raises(RuntimeError, match="Chromium"):
        save_figure(go.Figure(), tmp_path / "x", png=True)
    written = save_figure(go.Figure(), tmp_path / "y")  # png=None: HTML only
    assert [p.suffix for p in written] == [".html"]


def test_save_figure_png(tmp_path: Path) -> None:
    if viz.browser_path() is None:
        if os.environ.get("ALPHASTEER_LENS_REQUIRE_PNG") == "1":
            pytest.fail("ALPHASTEER_LENS_REQUIRE_PNG=1 but no Chrome/Chromium is installed")
        pytest.skip("no Chrome/Chromium installed: PNG export not available here")
    fig = tradeoff_figure(_tradeoff())
    paths = save_figure(fig, tmp_path / "t", scale=1.0)
    png = paths[1].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])
    assert (width, height) == (fig.layout.width, fig.layout.height)


def test_save_figure_retries_a_failed_browser_tab_but_not_other_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A kaleido error (its browser tab did not start: seen once under a loaded CPU) is retried
    and the PNG written; after ``PNG_TRIES`` failures, or on any other error, it is raised."""
    kaleido_error = type("JavascriptError", (Exception,), {"__module__": "kaleido._errors"})
    calls: list[int] = []

    def flaky(self: go.Figure, path: Path, **kw: object) -> None:
        calls.append(1)
        if len(calls) < 2:
            raise kaleido_error("ReferenceError: kaleido_scopes is not defined")
        Path(path).write_bytes(b"png")

    monkeypatch.setattr(viz, "browser_path", lambda: "/usr/bin/chromium")
    monkeypatch.setattr(go.Figure, "write_image", flaky)
    written = viz.save_figure(go.Figure(), tmp_path / "a", png=True)
    assert len(calls) == 2 and written[-1].read_bytes() == b"png"

    def always(self: go.Figure, path: Path, **kw: object) -> None:
        calls.append(1)
        raise kaleido_error("still broken")

    calls.clear()
    monkeypatch.setattr(go.Figure, "write_image", always)
    with pytest.raises(kaleido_error, match="still broken"):
        viz.save_figure(go.Figure(), tmp_path / "b", png=True)
    assert len(calls) == viz.PNG_TRIES

    def other(self: go.Figure, path: Path, **kw: object) -> None:
        calls.append(1)
        raise ValueError("bad figure")

    calls.clear()
    monkeypatch.setattr(go.Figure, "write_image", other)
    with pytest.raises(ValueError, match="bad figure"):
        viz.save_figure(go.Figure(), tmp_path / "c", png=True)
    assert len(calls) == 1
