"""Choosing the steered layers on validation data, for any model (after Arditi et al. 2024).

For each candidate layer ``l`` (every ``stride``-th layer, skipping the last ``skip_last`` share
of the model, where directions stop steering and start editing the output), the refusal direction
``r_l`` is added at that layer alone, ``h + λ r_l`` at the prompt positions, and two cheap
first-token numbers are measured on validation prompts:

- ``induced``: rise of the mean refusal log-odds on harmful prompts over the vanilla model;
- ``benign_kl``: mean ``KL(P_vanilla ‖ P_steered)`` of the first token on benign prompts.

``objective = induced − benign_kl``, with its standard error over the prompts
(``objective_se``). Windows of ``width`` consecutive layers are scored by the mean objective of
their evaluated candidates. The chosen window is the **earliest** whose score is within one
standard error of the best (the "one-standard-error rule" of model selection): later layers
edit the output more directly and their steering carries over less to prompts unlike the
validation ones, so among windows the validation data cannot tell apart, the one farthest from
the output is taken. ``one_se=False`` takes the best window itself (ties: the earlier).
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


def best_window(
    table: pd.DataFrame, width: int, top: int, *, one_se: bool = False
) -> tuple[int, ...]:
    """The ``width`` consecutive layers in ``[first candidate, top)`` whose rows of ``table``
    (columns ``layer``, ``objective``) have the highest mean objective; with ``one_se``, the
    earliest window whose mean is at least the best mean minus the best window's standard error
    (the mean ``objective_se`` of its candidates, a bound that holds however the layers'
    errors correlate)."""
    if table.empty:
        raise ValueError("no candidate layer was evaluated")
    low = int(table.layer.min())
    width = min(width, top - low)
    score = dict(zip(table.layer.astype(int), table.objective.astype(float), strict=True))
    errors = table["objective_se"] if "objective_se" in table else 0.0 * table.objective
    se = dict(zip(table.layer.astype(int), errors.astype(float), strict=True))
    windows: list[tuple[int, float, float]] = []  # start, mean objective, standard error
    for start in range(low, top - width + 1):
        inside = [layer for layer in range(start, start + width) if layer in score]
        if inside:
            mean = sum(score[x] for x in inside) / len(inside)
            windows.append((start, mean, sum(float(se[x]) for x in inside) / len(inside)))
    if not windows:
        raise ValueError("no candidate layer was evaluated")
    best = max(windows, key=lambda w: (w[1], -w[0]))
    floor = best[1] - best[2] if one_se else best[1]
    start = min(w[0] for w in windows if w[1] >= floor)
    return tuple(range(start, start + width))


def _var_of_mean(x: Tensor) -> float:
    """The squared standard error of the mean of ``x`` (0 for fewer than two values)."""
    return float(x.var() / x.numel()) if x.numel() > 1 else 0.0


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
    one_se: bool = True,
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
        induced, kl = (h - base_h).double(), first_token_kl(base_b, b)
        se = math.sqrt(_var_of_mean(induced) + _var_of_mean(kl))
        row = {"layer": layer, "induced": float(induced.mean()), "benign_kl": float(kl.mean())}
        rows.append(row | {"objective": row["induced"] - row["benign_kl"], "objective_se": se})
    columns = ["layer", "induced", "benign_kl", "objective", "objective_se"]
    table = pd.DataFrame(rows, columns=columns)
    layers = best_window(table, width, top, one_se=one_se)
    evaluated = [int(x) for x in table.layer] if len(table) else []
    rule = "the earliest within one standard error of the best" if one_se else "the best"
    how = (
        f"auto: {width} consecutive layers, {rule} by mean (induced harmful refusal "
        f"log-odds − benign first-token KL) at λ = {strength:g}, candidates {evaluated} "
        f"(last {n_layers - top} of {n_layers} layers skipped), {len(harmful)} harmful + "
        f"{len(benign)} benign validation prompts"
    )
    return LayerChoice(layers, how, table)
