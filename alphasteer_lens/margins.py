"""Refusal-direction geometry of a steering vector, on plain tensors (float64 math).

With ``r̂`` the unit refusal direction at a residual point: :func:`project_out` removes a vector's
component along ``r̂`` (``v − (v·r̂) r̂``), :func:`cosines` measures how much of it points there,
and :func:`margin_stats` says how far steering moves harmful activations toward the boundary
between harmful and harmless ones.
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from alphasteer_lens.directions import unit


def project_out(
    vectors: Float[Tensor, "layer d_model"], directions: Float[Tensor, "layer d_model"]
) -> Float[Tensor, "layer d_model"]:
    """Per row ``v − (v·r̂) r̂``: the vector without its component along the refusal direction
    (float64 math, returned in ``vectors``' dtype)."""
    if vectors.shape != directions.shape or vectors.ndim != 2:
        raise ValueError(
            f"vectors and directions must both be [layer, d_model], got {tuple(vectors.shape)} "
            f"and {tuple(directions.shape)}"
        )
    v, r = vectors.double(), unit(directions.double())
    return (v - (v * r).sum(-1, keepdim=True) * r).to(vectors.dtype)


def cosines(
    vectors: Float[Tensor, "layer d_model"], directions: Float[Tensor, "layer d_model"]
) -> Float[Tensor, " layer"]:
    """Per row cosine of ``v`` with ``r`` (float64; NaN where either is zero)."""
    v, r = vectors.double(), directions.double()
    den = v.norm(dim=-1) * r.norm(dim=-1)
    return torch.where(den > 0, (v * r).sum(-1) / den, torch.full_like(den, float("nan")))


def margin_stats(
    fit_harmful: Float[Tensor, "nf d_model"],
    fit_harmless: Float[Tensor, "nb d_model"],
    harmful: Float[Tensor, "n d_model"],
    steered: Float[Tensor, "n d_model"],
    direction: Float[Tensor, " d_model"],
) -> dict[str, float]:
    """Where held-out harmful activations sit along ``r̂ = direction/‖direction‖``, before
    (``harmful``) and after (``steered``, the same prompts) steering. ``boundary`` =
    midpoint of the fit class means of ``h·r̂``; ``gap`` = ``mean(harmful·r̂) − boundary``;
    ``shift`` = ``mean(steered·r̂) − mean(harmful·r̂)``; ``margin`` = ``mean(steered·r̂) −
    boundary``; ``margin_fraction`` = ``margin / gap``; ``above_boundary`` = share of steered rows
    with ``h·r̂ > boundary`` (still on the harmful side)."""
    if harmful.shape != steered.shape:
        raise ValueError(f"harmful {tuple(harmful.shape)} and steered {tuple(steered.shape)}")
    r = unit(direction.double())
    boundary = 0.5 * float((fit_harmful.double() @ r).mean() + (fit_harmless.double() @ r).mean())
    before, after = harmful.double() @ r, steered.double() @ r
    gap = float(before.mean()) - boundary
    margin = float(after.mean()) - boundary
    return {
        "boundary": boundary,
        "gap": gap,
        "shift": float(after.mean() - before.mean()),
        "margin": margin,
        "margin_fraction": margin / gap if gap != 0 else float("nan"),
        "above_boundary": float((after > boundary).double().mean()),
    }
