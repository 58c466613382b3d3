"""Refusal directions from activations (row vectors, one layer and position at a time).

- :func:`diff_in_means`: ``mean(harmful) − mean(harmless)`` (Arditi et al.);
- :func:`refused_minus_complied`: among harmful prompts, ``mean(refused) − mean(complied)``,
  labelled by the model's own answers (the AdaSteer recipe the AlphaSteer reference relies on).

Both point **toward refusal** and are computed in float64, returned as float32. Apply them per
layer with a dict comprehension, e.g. ``{l: diff_in_means(h[l], b[l]) for l in layers}``.
"""

from collections.abc import Sequence

import torch
from jaxtyping import Float
from torch import Tensor


def _rows(x: Tensor, what: str, d_model: int | None = None) -> Tensor:
    if not isinstance(x, Tensor) or x.ndim != 2:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{what} must be a 2-D tensor [n, d_model], got {shape}")
    if x.shape[0] == 0:
        raise ValueError(f"{what} are empty (0 rows)")
    if not torch.isfinite(x).all():
        raise ValueError(f"{what} contain NaN or inf")
    if d_model is not None and x.shape[1] != d_model:
        raise ValueError(f"{what} have d_model={x.shape[1]} but expected d_model={d_model}")
    return x.to(torch.float64)


def diff_in_means(
    harmful: Float[Tensor, "n_harmful d_model"], harmless: Float[Tensor, "n_harmless d_model"]
) -> Float[Tensor, " d_model"]:
    """Difference in means ``r = mean(H_harmful) − mean(H_harmless)`` (float32, computed in
    float64): the direction from harmless toward harmful activations, i.e. toward refusal."""
    a = _rows(harmful, "harmful activations")
    b = _rows(harmless, "harmless activations", a.shape[1])
    return (a.mean(0) - b.mean(0)).to(torch.float32)


def refused_minus_complied(
    activations: Float[Tensor, "n d_model"], refused: Sequence[bool] | Tensor
) -> Float[Tensor, " d_model"]:
    """``r = mean(h | refused) − mean(h | complied)`` over one prompt set (float32, computed in
    float64). Labels usually come from a judge of the model's own greedy answers to harmful
    prompts, so the direction separates refusing from complying rather than topic from topic."""
    h = _rows(activations, "activations")
    labels = torch.as_tensor(refused)
    if labels.ndim != 1 or labels.shape[0] != h.shape[0]:
        raise ValueError(
            f"refused must hold one label per activation row: got shape {tuple(labels.shape)} "
            f"for {h.shape[0]} rows"
        )
    if labels.dtype != torch.bool:
        if labels.is_floating_point() or not bool(((labels == 0) | (labels == 1)).all()):
            raise ValueError("refused labels must be booleans (or 0/1 integers)")
        labels = labels.to(torch.bool)
    labels = labels.to(h.device)
    n_refused = int(labels.sum())
    n_complied = int(labels.shape[0]) - n_refused
    if n_refused == 0 or n_complied == 0:
        raise ValueError(
            "refused_minus_complied needs at least one refused and one complied prompt; got "
            f"{n_refused} refused and {n_complied} complied"
        )
    return (h[labels].mean(0) - h[~labels].mean(0)).to(torch.float32)


def unit(v: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
    """``v / ‖v‖`` along the last dimension (each row of a batch on its own), computed in float64
    and returned in ``v``'s floating dtype. Raises on a zero (or non-finite) vector."""
    if not isinstance(v, Tensor) or v.ndim == 0:
        raise ValueError("unit() needs a tensor with at least one dimension")
    x = v.to(torch.float64)
    if not torch.isfinite(x).all():
        raise ValueError("cannot normalise a vector containing NaN or inf")
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    if bool((norm == 0).any()):
        raise ValueError("cannot normalise a zero vector")
    out_dtype = v.dtype if v.is_floating_point() else torch.float32
    return (x / norm).to(out_dtype)
