"""Vocabulary projection (logit lens) of directions: which tokens a direction promotes.

A direction ``r`` read at any layer is passed through the model's final norm and unembedding,
with their constant (bias) parts removed so that only the direction speaks:

    logits(r) = U(N(r)) − U(N(0))

``N`` is ``model.ln_final`` and ``U`` is ``model.unembed`` (both exist on TransformerBridge and on
TL 3.x HookedTransformer). For an RMSNorm this is ``(γ ⊙ r / rms(r)) W_U``; for a LayerNorm the
direction is also centred. SCANS reads these top tokens ("cannot", "sorry", ...) to decide which
layers carry the refusal behaviour.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from alphasteer_lens.models import HookedModel


def _module(model: HookedModel, name: str) -> Any:
    module = getattr(model, name, None)
    if module is None:
        raise ValueError(
            f"{type(model).__name__} has no '{name}' module: vocabulary projection needs a "
            "TransformerBridge or HookedTransformer with a final norm and an unembedding"
        )
    return module


@torch.no_grad()
def direction_logits(
    model: HookedModel, directions: Float[Tensor, "n d_model"], *, apply_norm: bool = True
) -> Float[Tensor, "n d_vocab"]:
    """``U(N(r)) − U(N(0))`` for each row ``r`` of ``directions`` (float32, on the CPU).

    ``apply_norm=False`` (or a model without ``ln_final``) skips the norm: ``U(r) − U(0) = r W_U``.
    """
    if not isinstance(directions, Tensor) or directions.ndim != 2:
        shape = tuple(directions.shape) if isinstance(directions, Tensor) else type(directions)
        raise ValueError(f"directions must be a 2-D tensor [n, d_model], got {shape}")
    d_model = int(model.cfg.d_model)
    if directions.shape[1] != d_model:
        raise ValueError(
            f"directions have d_model={directions.shape[1]} but the model has d_model={d_model}"
        )
    if not torch.isfinite(directions).all():
        raise ValueError("directions contain NaN or inf")
    unembed = _module(model, "unembed")
    weight = next(iter(unembed.parameters()))
    x = directions.to(weight.device, weight.dtype)
    # [1, 1+n, d]: TL 3.x modules expect [batch, pos, d_model]; row 0 is the zero vector.
    x = torch.cat([torch.zeros_like(x[:1]), x])[None]
    norm = getattr(model, "ln_final", None)
    if apply_norm and norm is not None:
        x = norm(x)
    logits = unembed(x)[0].float().cpu()
    return logits[1:] - logits[:1]


def vocab_projection(
    model: HookedModel,
    directions: Mapping[int, Tensor] | Float[Tensor, "n_layers d_model"],
    *,
    k: int = 10,
    apply_norm: bool = True,
) -> pd.DataFrame:
    """Top and bottom ``k`` tokens of each direction's vocabulary projection.

    ``directions`` maps layer → direction (or is a tensor, row ``i`` = layer ``i``). Returns a
    long DataFrame with columns ``layer, side ("top"|"bottom"), rank (0 = most extreme),
    token_id, token, logit``: ``2k`` rows per layer. Pivot it for a per-layer table, e.g.
    ``df[df.side == "top"].pivot(index="layer", columns="rank", values="token")``.
    """
    if isinstance(directions, Tensor):
        if directions.ndim != 2:
            raise ValueError(
                f"directions tensor must be [n_layers, d_model], got {directions.ndim}-D"
            )
        by_layer = {i: directions[i] for i in range(directions.shape[0])}
    else:
        by_layer = dict(directions)
    if not by_layer:
        raise ValueError("no directions given")
    layers = sorted(by_layer)
    stacked = torch.stack([by_layer[layer].detach().float().cpu() for layer in layers])
    logits = direction_logits(model, stacked, apply_norm=apply_norm)
    vocab = logits.shape[1]
    if not 1 <= k <= vocab:
        raise ValueError(f"k must be in [1, {vocab}] (the vocabulary size), got {k}")
    tok = model.tokenizer
    rows = []
    for i, layer in enumerate(layers):
        for side, largest in (("top", True), ("bottom", False)):
            values, ids = torch.topk(logits[i], k, largest=largest)
            for rank, (v, t) in enumerate(zip(values.tolist(), ids.tolist(), strict=True)):
                rows.append(
                    {
                        "layer": layer,
                        "side": side,
                        "rank": rank,
                        "token_id": int(t),
                        "token": tok.decode([int(t)]),
                        "logit": float(v),
                    }
                )
    return pd.DataFrame(rows)


def token_table(projection: pd.DataFrame, side: str = "top") -> pd.DataFrame:
    """A layer × rank table of tokens from :func:`vocab_projection` (``repr`` of each token, so
    leading spaces and newlines show)."""
    if side not in ("top", "bottom"):
        raise ValueError(f"side must be 'top' or 'bottom', got {side!r}")
    part = projection[projection.side == side]
    return part.pivot(index="layer", columns="rank", values="token").map(repr)
