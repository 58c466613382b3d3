"""Choosing the steered layers on validation data, for any model (after Arditi et al. 2024).

For each candidate layer ``l`` (every ``stride``-th layer, skipping the last ``skip_last`` share
of the model, where directions stop steering and start editing the output), the refusal direction
``r_l`` is added at that layer alone, ``h + λ r_l`` at the prompt positions, and two cheap
first-token numbers are measured on validation prompts:

- ``induced``: rise of the mean refusal log-odds on harmful prompts over the vanilla model;
- ``benign_kl``: mean ``KL(P_vanilla ‖ P_steered)`` of the first token on benign prompts.

``objective = induced − benign_kl``; the chosen layers are the window of ``width`` consecutive
layers whose evaluated candidates have the highest mean objective (ties: the earlier window).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
from torch import Tensor
from tqdm.auto import tqdm

from alphasteer_lens.formats import PromptFormat
from alphasteer_lens.generation import next_token_logits
from alphasteer_lens.hookpoints import RESID_PRE
from alphasteer_lens.judges import RefusalTokens, refusal_score
from alphasteer_lens.metrics import first_token_kl
from alphasteer_lens.models import HookedModel
from alphasteer_lens.steering import ActAdd


def candidate_layers(
    n_layers: int, *, skip_last: float = 0.2, stride: int | None = None
) -> list[int]:
    """Every ``stride``-th layer below ``floor(n_layers (1 − skip_last))`` (at least layer 0);
    ``stride`` None gives about 12 candidates."""
    top = max(1, math.floor(n_layers * (1.0 - skip_last)))
    step = stride or max(1, math.ceil(top / 12))
    return list(range(0, top, step))


def default_width(n_layers: int) -> int:
    """About a sixth of the layers (5 of SmolLM2's 30), at least one."""
    return max(1, round(n_layers / 6))


@dataclass(frozen=True)
class LayerChoice:
    """The steered layers, how they were chosen, and (when chosen here) the per-layer table."""

    layers: tuple[int, ...]
    how: str
    table: pd.DataFrame | None = None

    def to_dict(self) -> dict[str, Any]:
        table = None if self.table is None else self.table.to_dict(orient="records")
        return {"layers": list(self.layers), "how": self.how, "candidates": table}


def best_window(table: pd.DataFrame, width: int, top: int) -> tuple[int, ...]:
    """The ``width`` consecutive layers in ``[first candidate, top)`` whose rows of ``table``
    (columns ``layer``, ``objective``) have the highest mean objective."""
    if table.empty:
        raise ValueError("no candidate layer was evaluated")
    low = int(table.layer.min())
    width = min(width, top - low)
    score = dict(zip(table.layer.astype(int), table.objective.astype(float), strict=True))
    best: tuple[float, int] | None = None
    for start in range(low, top - width + 1):
        inside = [score[layer] for layer in range(start, start + width) if layer in score]
        if inside:
            mean = sum(inside) / len(inside)
            if best is None or mean > best[0]:
                best = (mean, start)
    if best is None:
        raise ValueError("no candidate layer was evaluated")
    return tuple(range(best[1], best[1] + width))


def choose_layers(
    model: HookedModel,
    refusal: Mapping[int, Tensor],
    harmful: Sequence[str],
    benign: Sequence[str],
    *,
    width: int | None = None,
    skip_last: float = 0.2,
    strength: float = 1.0,
    batch_size: int = 16,
    prompt_format: PromptFormat | None = None,
    hook_template: str = RESID_PRE,
    progress: bool = False,
) -> LayerChoice:
    """Steered layers for ``model`` (see the module docstring). ``refusal`` maps each candidate
    layer to its refusal direction (harmful − benign means of the fit activations), added at
    ``hook_template``."""
    n_layers = int(model.cfg.n_layers)
    top = max(1, math.floor(n_layers * (1.0 - skip_last)))
    width = width or default_width(n_layers)
    ids = RefusalTokens.from_tokenizer(model.tokenizer).ids
    kw: dict[str, Any] = {
        "batch_size": batch_size,
        "prompt_format": prompt_format,
        "progress": False,
    }
    base_h = refusal_score(next_token_logits(model, harmful, **kw), ids)
    base_b = next_token_logits(model, benign, **kw)
    rows = []
    # A zero direction (layer 0 at a chat template's last token, the same token for every
    # prompt) steers nothing and cannot be fitted: such layers, and those below, are left out.
    zero = [layer for layer in refusal if not bool(refusal[layer].any())]
    low = max(zero) + 1 if zero else 0
    todo = sorted(x for x in refusal if x >= low)
    for layer in tqdm(todo, desc="choosing layers", disable=not progress, leave=False):
        r = refusal[layer]
        st = ActAdd((layer,), r[None].float(), hook_template)
        h = refusal_score(
            next_token_logits(model, harmful, steering=st, strength=strength, **kw), ids
        )
        b = next_token_logits(model, benign, steering=st, strength=strength, **kw)
        induced = float((h - base_h).mean())
        kl = float(first_token_kl(base_b, b).mean())
        rows.append(
            {"layer": layer, "induced": induced, "benign_kl": kl, "objective": induced - kl}
        )
    table = pd.DataFrame(rows, columns=["layer", "induced", "benign_kl", "objective"])
    layers = best_window(table, width, top)
    evaluated = [int(x) for x in table.layer] if len(table) else []
    how = (
        f"auto: {width} consecutive layers with the highest mean (induced harmful refusal "
        f"log-odds − benign first-token KL) at λ = {strength:g}, candidates {evaluated} "
        f"(last {n_layers - top} of {n_layers} layers skipped), {len(harmful)} harmful + "
        f"{len(benign)} benign validation prompts"
    )
    return LayerChoice(layers, how, table)
