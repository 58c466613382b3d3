"""How an audit is shown: the plotly figure and the one-line verdict (the Markdown summary is
written by :mod:`alphasteer_lens.experiments.audit`).

Pure functions of the audit tables (:mod:`alphasteer_lens.audit`), so the same numbers always give
the same figure and text.
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from alphasteer_lens.viz import FONT, TEMPLATE

COLOURS = ("#a50f15", "#fc9272", "#08306b", "#6baed6", "#31a354", "#756bb1")


def _pct(x: Any) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.0%}"


def refusal_columns(table: pd.DataFrame) -> list[str]:
    """The per-set refusal-rate columns, pooled harmful first."""
    cols = [c for c in table.columns if c.startswith("refusal_")]
    return sorted(cols, key=lambda c: (c != "refusal_harmful", c == "refusal_jailbreak", c))


def audit_figure(
    table: pd.DataFrame, cos: pd.DataFrame, name: str, strength: float, probe_hook: str
) -> go.Figure:
    """Three panels: refusal rates per condition, harmful margin left (fraction of the vanilla
    gap) per condition, and the per-layer cosine of the vector with the refusal direction."""
    fig = make_subplots(
        rows=1,
        cols=3,
        column_widths=[0.45, 0.25, 0.3],
        subplot_titles=(
            "refusal rate (keyword judge)",
            f"harmful margin left<br>(fraction of gap, at {probe_hook})",
            "cos(vector, refusal direction)",
        ),
    )
    conditions = table["condition"].tolist()
    for i, col in enumerate(refusal_columns(table)):
        fig.add_trace(
            go.Bar(
                x=conditions,
                y=table[col],
                name=col.removeprefix("refusal_"),
                marker_color=COLOURS[i % len(COLOURS)],
                legendgroup="refusal",
            ),
            row=1,
            col=1,
        )
    fig.add_trace(
        go.Bar(x=conditions, y=table["margin_fraction"], marker_color="#525252", showlegend=False),
        row=1,
        col=2,
    )
    for y, dash in ((1.0, "dot"), (0.0, "solid")):
        fig.add_hline(y=y, line_dash=dash, line_color="#969696", row=1, col=2)
    for col, label, colour in (
        ("cosine", "vector", "#a50f15"),
        ("cosine_projected", "projected", "#08306b"),
    ):
        fig.add_trace(
            go.Scatter(
                x=cos["layer"], y=cos[col], mode="lines+markers", name=label, line_color=colour
            ),
            row=1,
            col=3,
        )
    fig.update_yaxes(range=[0, 1.05], title_text="rate", row=1, col=1)
    fig.update_yaxes(title_text="margin / gap", row=1, col=2)
    fig.update_yaxes(range=[-1, 1], title_text="cosine", row=1, col=3)
    fig.update_xaxes(title_text="layer", row=1, col=3)
    fig.update_layout(
        template=TEMPLATE,
        font=FONT,
        barmode="group",
        width=1300,
        height=480,
        title=f"Steering externalities audit: {name} vector at λ = {strength:g}",
        margin={"l": 70, "r": 20, "t": 100, "b": 110},
    )
    return fig


def _row(table: pd.DataFrame, condition: str) -> pd.Series | None:
    rows = table[table["condition"] == condition]
    return rows.iloc[0] if len(rows) else None


def verdict(table: pd.DataFrame, cos: pd.DataFrame, name: str, strength: float) -> str:
    """One line: refusal and margin without → with the vector, what each mitigation leaves, and
    the benign gain."""
    base, steered = _row(table, "without vector"), _row(table, "with vector")
    if base is None or steered is None:
        raise ValueError("the audit table needs 'without vector' and 'with vector' rows")
    parts = [
        f"{name} vector at λ={strength:g}: harmful refusal {_pct(base.refusal_harmful)} → "
        f"{_pct(steered.refusal_harmful)}, jailbreak refusal {_pct(base.refusal_jailbreak)} → "
        f"{_pct(steered.refusal_jailbreak)}, margin {base.margin:.2f} → {steered.margin:.2f} "
        f"({_pct(steered.margin_fraction)} of the gap left; shift {steered['shift']:+.2f}), "
        f"mean cos with the refusal direction {cos['cosine'].mean():+.2f}"
    ]
    for cond in table["condition"].tolist()[2:]:
        row = table[table["condition"] == cond].iloc[0]
        parts.append(
            f"{cond}: refusal {_pct(row.refusal_harmful)} (jailbreak "
            f"{_pct(row.refusal_jailbreak)}), margin {_pct(row.margin_fraction)} of the gap"
        )
    gains = []
    for col, label in (("compliance_rate", "compliance"), ("json_valid", "JSON valid")):
        if col in table.columns and not math.isnan(float(steered.get(col, math.nan))):
            gains.append(f"{label} {_pct(base[col])} → {_pct(steered[col])}")
    if gains:
        parts.append("gain: " + ", ".join(gains))
    return "; ".join(parts) + "."
