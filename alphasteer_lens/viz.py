"""Plotly figures of PCA views and sweeps, and saving them as HTML and PNG.

Everything here is a pure function of its DataFrame input: no randomness, so the same data gives
the same figure (and the same files) every time.

- :func:`pca_figure`: benign/malicious × vanilla/steered in one PCA basis, one panel per method,
  95% confidence ellipses and marginal densities;
- :func:`strength_figure`: the same axes at several strengths λ, one row per method;
- :func:`layer_sweep_figure`: direction quality, induced refusal and benign KL per layer;
- :func:`tradeoff_figure`: safety (harmful refusal) vs utility (benign KL / refusal) curves;
- :func:`save_figure`: ``.html`` always, ``.png`` through kaleido when a Chromium is installed.

PNG export needs a Chrome/Chromium binary (kaleido 1.x drives it); on Debian/Ubuntu
``apt-get install chromium`` is enough. This module never downloads a browser.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from alphasteer_lens.pca import PCABasis

# (label, condition) -> colour, marker symbol, ellipse dash
STYLE: dict[tuple[str, str], tuple[str, str, str]] = {
    ("benign", "vanilla"): ("#6baed6", "circle-open", "dot"),
    ("benign", "steered"): ("#08306b", "circle", "solid"),
    ("malicious", "vanilla"): ("#fc9272", "diamond-open", "dot"),
    ("malicious", "steered"): ("#a50f15", "diamond", "solid"),
}
METHOD_NAMES = {
    "alphasteer": "AlphaSteer",
    "alphasteer_calibrated": "Calibrated AlphaSteer",
    "actadd": "ActAdd",
    "actadd_calibrated": "Calibrated ActAdd",
    "ablation": "Ablation",
    "cast": "CAST",
}
LABELS = {
    "auroc": "AUROC of h·r̂<br>(harmful vs harmless)",
    "harmful_refusal": "harmful refusal rate",
    "benign_refusal": "benign refusal rate",
    "harmful_score": "harmful refusal log-odds",
    "benign_kl": "benign first-token KL (nats)",
    "benign_unchanged": "benign answers unchanged (fraction)",
    "benign_top1_unchanged": "benign first token unchanged",
    "strength": "λ",
    "ratio": "null-space ratio k/d",
}
MODE_NOTES = {
    "logit": "logit mode: refusal log-odds > 0 at the first generated token",
    "generation": "generation mode: keyword judge on greedy answers",
}
TEMPLATE = "plotly_white"
FONT = {"family": "Arial, Helvetica, sans-serif", "size": 13}
CHI2_95_2DOF = -2.0 * math.log(0.05)  # 95% quantile of χ² with 2 degrees of freedom


def method_name(method: str) -> str:
    return METHOD_NAMES.get(method, method)


def _need(df: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"{what} needs columns {missing}; got {list(df.columns)}")
    if df.empty:
        raise ValueError(f"{what}: the DataFrame is empty")


def confidence_ellipse(
    xy: np.ndarray, *, quantile: float = CHI2_95_2DOF, n_points: int = 100
) -> np.ndarray:
    """Boundary of ``{z : (z − μ)ᵀ Σ⁻¹ (z − μ) = quantile}`` for the sample mean ``μ`` and
    covariance ``Σ`` of the rows of ``xy`` (default: the 95% Gaussian ellipse), as
    ``[n_points, 2]``."""
    xy = np.asarray(xy, dtype=np.float64)
    if xy.ndim != 2 or xy.shape[1] != 2 or xy.shape[0] < 3:
        raise ValueError(f"need at least 3 points of shape [n, 2], got {xy.shape}")
    mu = xy.mean(0)
    vals, vecs = np.linalg.eigh(np.cov(xy, rowvar=False))
    t = np.linspace(0.0, 2.0 * np.pi, n_points)
    circle = np.stack([np.cos(t), np.sin(t)], axis=1)
    return mu + math.sqrt(quantile) * (circle * np.sqrt(np.clip(vals, 0, None))) @ vecs.T


def gaussian_kde(values: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Gaussian kernel density of ``values`` on ``grid`` with Scott's bandwidth
    ``h = σ n^(−1/5)``: ``f(x) = (1/n) Σ_i N(x; v_i, h²)``."""
    v = np.asarray(values, dtype=np.float64)
    sd = v.std(ddof=1) if v.size > 1 else 0.0
    h = max(sd * v.size ** (-0.2), 1e-12)
    z = (np.asarray(grid, dtype=np.float64)[:, None] - v[None, :]) / h
    return np.exp(-0.5 * z**2).sum(1) / (v.size * h * math.sqrt(2.0 * math.pi))


def _range(values: np.ndarray, pad: float = 0.08) -> list[float]:
    lo, hi = float(np.min(values)), float(np.max(values))
    span = hi - lo or 1.0
    return [lo - pad * span, hi + pad * span]


def _sets(panel: pd.DataFrame) -> list[tuple[tuple[str, str], pd.DataFrame]]:
    return [(key, panel[(panel.label == key[0]) & (panel.condition == key[1])]) for key in STYLE]


def _hover(prompts: pd.Series) -> list[str]:
    return [p if len(p) <= 90 else p[:87] + "..." for p in prompts.astype(str)]


def _add_cloud(
    fig: go.Figure,
    part: pd.DataFrame,
    key: tuple[str, str],
    row: int,
    col: int,
    show_legend: bool,
) -> None:
    colour, symbol, dash = STYLE[key]
    name = f"{key[0]}, {key[1]}"
    hover = _hover(part["prompt"]) if "prompt" in part else None
    fig.add_trace(
        go.Scatter(
            x=part.pc1,
            y=part.pc2,
            mode="markers",
            name=name,
            legendgroup=name,
            showlegend=show_legend,
            marker={"color": colour, "symbol": symbol, "size": 6, "opacity": 0.75},
            hovertext=hover,
            hoverinfo="text" if hover is not None else None,
        ),
        row=row,
        col=col,
    )
    if len(part) >= 3:
        ell = confidence_ellipse(part[["pc1", "pc2"]].to_numpy())
        fig.add_trace(
            go.Scatter(
                x=ell[:, 0],
                y=ell[:, 1],
                mode="lines",
                line={"color": colour, "dash": dash, "width": 2},
                name=f"{name} (95% ellipse)",
                legendgroup=name,
                showlegend=False,
                hoverinfo="skip",
            ),
            row=row,
            col=col,
        )


def _panel_title(method: str, lam: float) -> str:
    return f"{method_name(method)}, λ = {lam:g}"


def pca_figure(
    points: pd.DataFrame,
    *,
    basis: PCABasis | None = None,
    methods: Sequence[str] | None = None,
    strength: float | None = None,
    title: str | None = None,
) -> go.Figure:
    """Benign vs malicious × vanilla vs steered in one PCA plane, one panel per method (left to
    right in ``methods`` order), with 95% ellipses and marginal densities of PC1 (top) and PC2
    (right). ``points`` is :func:`~alphasteer_lens.pca.pca_points`' DataFrame; ``strength``
    picks one λ when a method holds several (without it, each method's panel shows its only λ,
    so methods may be drawn at their own strengths). All panels share the same axis ranges."""
    _need(points, ["method", "strength", "mode", "label", "condition", "pc1", "pc2"], "pca_figure")
    lams = sorted(points.strength.unique())
    if strength is None:
        several = points.groupby("method").strength.nunique()
        if (several > 1).any():
            raise ValueError(f"points hold strengths {lams}; pass strength= to pick one")
        data = points
    else:
        data = points[np.isclose(points.strength, strength)]
    if data.empty:
        raise ValueError(f"no points at strength {strength} (have {lams})")
    order = list(methods) if methods is not None else list(dict.fromkeys(data.method))
    unknown = [m for m in order if m not in set(data.method)]
    if unknown:
        raise ValueError(f"methods {unknown} not in points (have {sorted(set(data.method))})")
    lam_of = {m: float(data[data.method == m].strength.iloc[0]) for m in order}
    n = len(order)
    fig = make_subplots(
        rows=2,
        cols=2 * n,
        column_widths=[0.8, 0.2] * n,
        row_heights=[0.2, 0.8],
        horizontal_spacing=0.02,
        vertical_spacing=0.02,
        subplot_titles=[t for m in order for t in (_panel_title(m, lam_of[m]), "")]
        + [""] * (2 * n),
    )
    xr, yr = _range(data.pc1.to_numpy()), _range(data.pc2.to_numpy())
    gx, gy = np.linspace(xr[0], xr[1], 200), np.linspace(yr[0], yr[1], 200)
    x_title = basis.axis_title(0) if basis is not None else "PC1"
    y_title = basis.axis_title(1) if basis is not None else "PC2"
    for i, method in enumerate(order):
        col = 2 * i + 1
        panel = data[data.method == method]
        for key, part in _sets(panel):
            if part.empty:
                continue
            _add_cloud(fig, part, key, 2, col, show_legend=i == 0)
            colour, _, dash = STYLE[key]
            line = {"color": colour, "dash": dash, "width": 1.5}
            fig.add_trace(
                go.Scatter(
                    x=gx,
                    y=gaussian_kde(part.pc1.to_numpy(), gx),
                    mode="lines",
                    line=line,
                    showlegend=False,
                    hoverinfo="skip",
                ),
                row=1,
                col=col,
            )
            fig.add_trace(
                go.Scatter(
                    x=gaussian_kde(part.pc2.to_numpy(), gy),
                    y=gy,
                    mode="lines",
                    line=line,
                    showlegend=False,
                    hoverinfo="skip",
                ),
                row=2,
                col=col + 1,
            )
        fig.update_xaxes(range=xr, title_text=x_title, row=2, col=col)
        fig.update_yaxes(range=yr, title_text=y_title if i == 0 else None, row=2, col=col)
        fig.update_xaxes(range=xr, showticklabels=False, row=1, col=col)
        fig.update_yaxes(
            showticklabels=False, title_text="density" if i == 0 else None, row=1, col=col
        )
        fig.update_yaxes(range=yr, showticklabels=False, row=2, col=col + 1)
        fig.update_xaxes(showticklabels=False, row=2, col=col + 1)
        fig.update_xaxes(visible=False, row=1, col=col + 1)
        fig.update_yaxes(visible=False, row=1, col=col + 1)
    mode = str(data["mode"].iloc[0])
    hook = basis.hook if basis is not None and basis.hook else "the chosen hook"
    fig.update_layout(
        title=title or f"Last-token activations at {hook}: vanilla vs steered ({mode})",
        template=TEMPLATE,
        font=FONT,
        width=560 * n + 120,
        height=620,
        legend={"orientation": "h", "yanchor": "top", "y": -0.12, "x": 0.0},
        margin={"l": 70, "r": 20, "t": 80, "b": 110},
    )
    return fig


def strength_figure(
    points: pd.DataFrame,
    *,
    basis: PCABasis | None = None,
    methods: Sequence[str] | None = None,
    title: str | None = None,
) -> go.Figure:
    """The PCA plane at every strength in ``points`` (columns, increasing λ), one row per
    method: where the steered clouds drift as λ grows. Same axis ranges everywhere."""
    _need(points, ["method", "strength", "label", "condition", "pc1", "pc2"], "strength_figure")
    order = list(methods) if methods is not None else list(dict.fromkeys(points.method))
    lams = sorted(float(v) for v in points.strength.unique())
    fig = make_subplots(
        rows=len(order),
        cols=len(lams),
        shared_xaxes=True,
        shared_yaxes=True,
        horizontal_spacing=0.02,
        vertical_spacing=0.08,
        subplot_titles=[_panel_title(m, lam) for m in order for lam in lams],
    )
    data = points[points.method.isin(order)]
    xr, yr = _range(data.pc1.to_numpy()), _range(data.pc2.to_numpy())
    for i, method in enumerate(order):
        for j, lam in enumerate(lams):
            panel = data[(data.method == method) & np.isclose(data.strength, lam)]
            for key, part in _sets(panel):
                if not part.empty:
                    _add_cloud(fig, part, key, i + 1, j + 1, show_legend=i == 0 and j == 0)
            fig.update_xaxes(range=xr, row=i + 1, col=j + 1)
            fig.update_yaxes(range=yr, row=i + 1, col=j + 1)
    x_title = basis.axis_title(0) if basis is not None else "PC1"
    y_title = basis.axis_title(1) if basis is not None else "PC2"
    for j in range(len(lams)):
        fig.update_xaxes(title_text=x_title, row=len(order), col=j + 1)
    for i in range(len(order)):
        fig.update_yaxes(title_text=y_title, row=i + 1, col=1)
    hook = basis.hook if basis is not None and basis.hook else "the chosen hook"
    mode = str(points["mode"].iloc[0]) if "mode" in points else "real"
    fig.update_layout(
        title=title or f"Strength progression at {hook} ({mode} steered activations)",
        template=TEMPLATE,
        font=FONT,
        width=300 * len(lams) + 120,
        height=320 * len(order) + 170,
        legend={"orientation": "h", "yanchor": "top", "y": -0.1, "x": 0.0},
        margin={"l": 70, "r": 20, "t": 90, "b": 120},
    )
    return fig


def _best_layer_line(fig: go.Figure, df: pd.DataFrame, column: str, row: int, text: str) -> None:
    values = df[column]
    if values.isna().all():
        return
    best = df.loc[values.idxmax()]
    fig.add_vline(x=float(best.layer), line={"color": "#636363", "dash": "dot"}, row=row, col=1)
    fig.add_annotation(
        x=float(best.layer),
        y=float(best[column]),
        text=f"{text}: layer {int(best.layer)}",
        showarrow=True,
        arrowhead=2,
        ax=50,
        ay=-22,
        row=row,
        col=1,
    )


def _lines(
    fig: go.Figure,
    df: pd.DataFrame,
    series: Sequence[tuple[str, str, str, str]],
    row: int,
) -> None:
    for col, name, colour, dash in series:
        fig.add_trace(
            go.Scatter(
                x=df.layer,
                y=df[col],
                mode="lines+markers",
                name=name,
                line={"color": colour, "dash": dash},
            ),
            row=row,
            col=1,
        )


def _vanilla_lines(
    fig: go.Figure, vanilla: dict[str, float], cols: Sequence[tuple[str, str]], row: int
) -> None:
    for col, colour in cols:
        if col in vanilla:
            line = {"color": colour, "dash": "dash", "width": 1}
            fig.add_hline(y=float(vanilla[col]), line=line, row=row, col=1)


def layer_sweep_figure(
    sweep: pd.DataFrame, *, generation: pd.DataFrame | None = None, title: str | None = None
) -> go.Figure:
    """Stacked panels over depth, for :func:`~alphasteer_lens.sweeps.layer_sweep` output:
    (a) direction quality (AUROC of ``h·r̂_l``); (b) refusal log-odds at the first generated
    token when adding ``λ r_l`` at that single layer (harmful and benign prompts); (c) only
    when a generation-mode sweep is given (as ``sweep`` or ``generation``): the keyword-judge
    refusal rate of greedy answers; last, the benign first-token KL. Dashed: vanilla model."""
    cols = ["layer", "auroc", "harmful_score", "benign_score", "benign_kl", "mode", "strength"]
    _need(sweep, cols, "layer_sweep_figure")
    df = sweep.sort_values("layer")
    if generation is None and str(df["mode"].iloc[0]) == "generation":
        generation = df
    if generation is not None:
        _need(generation, ["layer", "harmful_refusal_gen", "benign_refusal_gen"], "generation")
        generation = generation.sort_values("layer")
    lam = float(df.strength.iloc[0])
    titles = [
        "(a) direction quality: difference-in-means r_l, AUROC on held-out prompts",
        f"(b) refusal log-odds at the first token when adding λ·r_l at layer l only (λ = {lam:g})",
    ]
    if generation is not None:
        titles.append("(c) refusal rate of greedy answers (keyword judge), same steering")
    titles.append(
        f"({'abcd'[len(titles)]}) utility cost: KL(vanilla ‖ steered), benign first token"
    )
    n_rows = len(titles)
    fig = make_subplots(
        rows=n_rows, cols=1, shared_xaxes=True, vertical_spacing=0.06, subplot_titles=titles
    )
    vanilla = dict(sweep.attrs.get("vanilla", {}))
    _lines(fig, df, [("auroc", "AUROC (harmful vs harmless)", "#54278f", "solid")], 1)
    fig.add_hline(y=0.5, line={"color": "#969696", "dash": "dash"}, row=1, col=1)
    _lines(
        fig,
        df,
        [
            ("harmful_score", "harmful prompts", "#a50f15", "solid"),
            ("benign_score", "benign prompts", "#08519c", "solid"),
        ],
        2,
    )
    _vanilla_lines(fig, vanilla, [("harmful_score", "#a50f15"), ("benign_score", "#08519c")], 2)
    if generation is not None:
        _lines(
            fig,
            generation,
            [
                ("harmful_refusal_gen", "harmful prompts (greedy answers)", "#fb6a4a", "dot"),
                ("benign_refusal_gen", "benign prompts (greedy answers)", "#6baed6", "dot"),
            ],
            3,
        )
        gen_vanilla = dict(generation.attrs.get("vanilla", {}))
        _vanilla_lines(
            fig,
            gen_vanilla,
            [("harmful_refusal_gen", "#fb6a4a"), ("benign_refusal_gen", "#6baed6")],
            3,
        )
        fig.update_yaxes(title_text="refusal rate", rangemode="tozero", row=3, col=1)
    _lines(fig, df, [("benign_kl", "benign KL", "#006d2c", "solid")], n_rows)
    _best_layer_line(fig, df, "auroc", 1, "best AUROC")
    _best_layer_line(fig, df, "harmful_score", 2, "most induced refusal")
    fig.update_yaxes(title_text="AUROC", row=1, col=1)
    fig.update_yaxes(title_text="log-odds", row=2, col=1)
    fig.update_yaxes(title_text="KL (nats)", rangemode="tozero", row=n_rows, col=1)
    fig.update_xaxes(
        title_text="layer l (hook blocks.l.hook_resid_pre)", dtick=2, row=n_rows, col=1
    )
    fig.update_layout(
        title=title or "Layer sweep: where the refusal direction is strongest",
        template=TEMPLATE,
        font=FONT,
        width=920,
        height=230 * n_rows + 180,
        legend={"orientation": "h", "yanchor": "top", "y": -0.06, "x": 0.0},
        margin={"l": 80, "r": 20, "t": 90, "b": 100},
    )
    return fig


def tradeoff_figure(
    sweep: pd.DataFrame,
    *,
    xs: Sequence[str] = ("benign_kl", "benign_refusal"),
    ys: Sequence[str] = ("harmful_refusal",),
    param: str = "strength",
    title: str | None = None,
) -> go.Figure:
    """Safety vs utility: each safety measure in ``ys`` (rows) against each utility cost in
    ``xs`` (columns), one curve per method ordered by ``param`` (λ or the null-space ratio),
    every marker labelled with its ``param`` value. The star is the vanilla model
    (``sweep.attrs["vanilla"]``). Higher is safer; lower KL / benign refusal and more benign
    answers unchanged is more useful."""
    _need(sweep, ["method", param, *ys, *xs], "tradeoff_figure")
    fig = make_subplots(rows=len(ys), cols=len(xs), horizontal_spacing=0.08, vertical_spacing=0.12)
    colours = {"alphasteer": "#a50f15", "actadd": "#2171b5"}
    vanilla = sweep.attrs.get("vanilla", {})
    short = {"strength": "λ", "ratio": "r"}.get(param, param)
    for i, y in enumerate(ys):
        for j, x in enumerate(xs):
            first = i == 0 and j == 0
            for method in dict.fromkeys(sweep.method):
                part = sweep[sweep.method == method].sort_values(param)
                fig.add_trace(
                    go.Scatter(
                        x=part[x],
                        y=part[y],
                        mode="lines+markers+text",
                        text=[f"{short}={v:g}" for v in part[param]],
                        textposition="top center",
                        textfont={"size": 10},
                        name=method_name(method),
                        legendgroup=method,
                        showlegend=first,
                        line={"color": colours.get(method, "#525252")},
                    ),
                    row=i + 1,
                    col=j + 1,
                )
            if x in vanilla and y in vanilla:
                fig.add_trace(
                    go.Scatter(
                        x=[vanilla[x]],
                        y=[vanilla[y]],
                        mode="markers",
                        marker={"symbol": "star", "size": 14, "color": "#252525"},
                        name="vanilla",
                        legendgroup="vanilla",
                        showlegend=first,
                    ),
                    row=i + 1,
                    col=j + 1,
                )
            fig.update_xaxes(title_text=LABELS.get(x, x), row=i + 1, col=j + 1)
            fig.update_yaxes(title_text=LABELS.get(y, y) if j == 0 else None, row=i + 1, col=j + 1)
    mode = str(sweep["mode"].iloc[0]) if "mode" in sweep else None
    note = f"<br><sup>{MODE_NOTES[mode]}</sup>" if mode in MODE_NOTES else ""
    fig.update_layout(
        title=title or f"Safety vs utility over {LABELS.get(param, param)}{note}",
        template=TEMPLATE,
        font=FONT,
        width=430 * len(xs) + 100,
        height=400 * len(ys) + 170,
        legend={"orientation": "h", "yanchor": "top", "y": -0.08 - 0.06 / len(ys), "x": 0.0},
        margin={"l": 80, "r": 20, "t": 100, "b": 100},
    )
    return fig


def browser_path() -> str | None:
    """The Chrome/Chromium kaleido would use (``$BROWSER_PATH`` first), or ``None``. Never
    downloads one."""
    try:
        from choreographer.browsers.chromium import Chromium
    except ImportError:
        return os.environ.get("BROWSER_PATH")
    return Chromium.find_browser(skip_local=False)


PNG_TRIES = 3  # kaleido errors (a browser tab that did not start) are retried this often


def save_figure(
    fig: go.Figure,
    path_stem: str | Path,
    *,
    png: bool | None = None,
    scale: float = 2.0,
    include_plotlyjs: bool | str = "cdn",
) -> list[Path]:
    """Write ``{path_stem}.html`` and ``{path_stem}.png``; return the paths written.

    ``png=None`` writes the PNG when a browser is installed (see :func:`browser_path`);
    ``png=True`` raises if none is; ``png=False`` skips it. The HTML loads plotly.js from its
    CDN by default (``include_plotlyjs=True`` embeds it, ~4 MB) and has a fixed div id, so the
    same figure always gives the same bytes.
    """
    stem = Path(path_stem)
    if stem.suffix in (".html", ".png"):
        stem = stem.with_suffix("")
    stem.parent.mkdir(parents=True, exist_ok=True)
    html = stem.with_name(stem.name + ".html")
    fig.write_html(
        html,
        include_plotlyjs=include_plotlyjs,
        div_id=f"fig-{stem.name}",
        config={"displaylogo": False},
    )
    written = [html]
    if png is None:
        png = browser_path() is not None
    elif png and browser_path() is None:
        raise RuntimeError(
            "PNG export needs Chrome or Chromium for kaleido and none was found; install one "
            "(e.g. `apt-get install chromium`) or set BROWSER_PATH, or pass png=False"
        )
    if png:
        out = stem.with_name(stem.name + ".png")
        width = fig.layout.width or 900
        height = fig.layout.height or 600
        for attempt in range(PNG_TRIES):
            try:
                fig.write_image(out, format="png", width=width, height=height, scale=scale)
                break
            except Exception as e:  # kaleido's browser tab sometimes fails to start under load
                if attempt == PNG_TRIES - 1 or not type(e).__module__.startswith("kaleido"):
                    raise
        written.append(out)
    return written
