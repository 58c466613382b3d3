"""Steering externalities audit (Xiong et al., 2026): what a benign steering vector costs in safety.

For a vector ``v`` (an :class:`~alphasteer_lens.steering.ActAdd`) at strength λ, each condition
(without it, with it, and each mitigation) is measured on the same prompts:

- keyword refusal rate of greedy answers to each harmful set and to jailbreak-wrapped ones;
- first-token ``KL(P_vanilla ‖ P_steered)`` and refusal log-odds on the harmful prompts;
- the refusal-direction geometry at a probe point after the steered layers: with ``r̂`` the unit
  difference-in-means refusal direction there and ``b = (mean(H_harm·r̂) + mean(H_harmless·r̂))/2``
  the decision boundary of the (vanilla) fit sets, the ``shift`` of held-out harmful activations
  along ``r̂`` and the ``margin = mean(H_steered·r̂) − b`` left (``margin_fraction``: of the
  vanilla margin, the "gap");
- the benign gain the vector was made for: compliance rate and JSON validity (``json.loads``).

Mitigations: ``projected`` steers with ``v − (v·r̂) r̂`` per layer; ``+alphasteer`` adds an
AlphaSteer fitted at the vector's hooks on top of ``v`` (a ``steering.Composition``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm

from alphasteer_lens.activations import cache_activations
from alphasteer_lens.alphasteer import AlphaSteer
from alphasteer_lens.audit_report import audit_figure, verdict
from alphasteer_lens.directions import diff_in_means
from alphasteer_lens.generation import generate, next_token_logits
from alphasteer_lens.judges import KeywordJudge, RefusalTokens, refusal_score
from alphasteer_lens.margins import cosines, margin_stats, project_out
from alphasteer_lens.metrics import first_token_kl
from alphasteer_lens.models import HookedModel
from alphasteer_lens.steering import ActAdd, Composition, Steering, check_strength, steer

Composed = Sequence[tuple[Steering, float]]


def _composition(steerings: Composed) -> Composition | None:
    return Composition(tuple(steerings)) if steerings else None


_HOOK = re.compile(r"^blocks\.\{layer\}\.hook_resid_(pre|post)$")
_FENCE = re.compile(r"^```[a-zA-Z]*\s*|\s*```\s*$")


def json_valid(text: str) -> bool:
    """Whether ``text`` (surrounding space and one Markdown code fence removed) parses with
    ``json.loads``."""
    try:
        json.loads(_FENCE.sub("", text.strip()))
    except ValueError:
        return False
    return True


def json_opening(text: str) -> bool:
    """Whether ``text`` opens a JSON value (``{`` or ``[``, after an optional code fence): the
    format was adopted even where the answer is cut off before it closes."""
    return _FENCE.sub("", text.strip()).lstrip()[:1] in ("{", "[")


# --- the audit ----------------------------------------------------------------------------------


def point_of(template: str, layer: int) -> int:
    """Residual-stream point of a hook: ``resid_pre L`` is point ``L``, ``resid_post L`` is
    ``L + 1`` (the same tensor as ``resid_pre L+1``)."""
    m = _HOOK.match(template)
    if m is None:
        raise ValueError(
            f"the audit supports vectors at blocks.{{layer}}.hook_resid_pre or hook_resid_post, "
            f"not {template!r}"
        )
    return layer + (m.group(1) == "post")


def point_hook(point: int, n_layers: int) -> str:
    """The hook name of residual point ``point`` (0 … n_layers)."""
    if point < n_layers:
        return f"blocks.{point}.hook_resid_pre"
    return f"blocks.{n_layers - 1}.hook_resid_post"


@dataclass(frozen=True)
class AuditSets:
    """Prompts of an audit. ``harmful``: named held-out harmful sets (refusal per set and pooled;
    the pooled set also gives KL and the margin). ``fit_*``: the sets defining the refusal
    direction, the decision boundary and the AlphaSteer fit. ``compliance``: benign (ideally
    refusable-sounding) prompts; ``json``: prompts asking for JSON."""

    harmful: Mapping[str, Sequence[str]]
    jailbreak: Sequence[str]
    fit_harmful: Sequence[str]
    fit_harmless: Sequence[str]
    compliance: Sequence[str]
    json: Sequence[str]

    def pooled(self) -> list[str]:
        return [p for ps in self.harmful.values() for p in ps]


@dataclass(frozen=True)
class AuditResult:
    """One vector's audit: ``table`` (one row per condition), ``cosines`` (per layer), a plotly
    ``figure`` and a one-line ``verdict``."""

    name: str
    strength: float
    probe_hook: str
    table: pd.DataFrame
    cosines: pd.DataFrame
    figure: Any
    verdict: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "strength": self.strength,
            "probe_hook": self.probe_hook,
            "table": self.table.to_dict(orient="records"),
            "cosines": self.cosines.to_dict(orient="records"),
            "verdict": self.verdict,
        }


@dataclass
class Auditor:
    """Audits vectors on one model and prompt sets; the unsteered model's answers, logits and
    activations (at every residual point) are computed once, in :meth:`create`."""

    model: HookedModel
    sets: AuditSets
    max_new_tokens: int = 24
    json_tokens: int = 64
    batch_size: int = 16
    alphasteer_strength: float = 0.5
    ratio: float = 0.5
    alpha: float = 10.0
    cache: bool = False
    progress: bool = False
    judge: KeywordJudge = field(default_factory=KeywordJudge)
    fit: dict[str, dict[int, Tensor]] = field(default_factory=dict)
    vanilla_acts: dict[int, Tensor] = field(default_factory=dict)
    vanilla_logits: Tensor = field(default_factory=lambda: torch.empty(0))
    vanilla: dict[str, float] = field(default_factory=dict)
    _memo: dict[tuple[Any, ...], Any] = field(default_factory=dict)

    @classmethod
    def create(cls, model: HookedModel, sets: AuditSets, **settings: Any) -> Auditor:
        """Cache the fit and held-out activations at every residual point and run the
        unsteered model once (both benign gains included)."""
        self = cls(model, sets, **settings)
        n = int(model.cfg.n_layers)
        hooks = [point_hook(p, n) for p in range(n + 1)]
        kw: dict[str, Any] = {"hooks": hooks, "batch_size": self.batch_size, "cache": self.cache}
        for name, ps in (("harmful", sets.fit_harmful), ("harmless", sets.fit_harmless)):
            acts = cache_activations(model, list(ps), progress=self.progress, desc=name, **kw)
            self.fit[name] = {p: acts.tensors[h] for p, h in enumerate(hooks)}
        acts = cache_activations(model, sets.pooled(), progress=False, **kw)
        self.vanilla_acts = {p: acts.tensors[h] for p, h in enumerate(hooks)}
        self.vanilla_logits = self._logits(sets.pooled(), [])
        self.vanilla = self._run([], ("compliance", "json"))
        return self

    def refusal(self, point: int) -> Tensor:
        """Difference-in-means refusal direction (harmful − harmless fit sets) at a point."""
        return diff_in_means(self.fit["harmful"][point], self.fit["harmless"][point])

    def alphasteer(self, vector: ActAdd) -> AlphaSteer:
        """AlphaSteer fitted at ``vector``'s hooks (memoised per hook set)."""
        key = ("alphasteer", vector.hook_template, vector.layers)
        if key not in self._memo:
            pts = {layer: point_of(vector.hook_template, layer) for layer in vector.layers}
            benign = {layer: self.fit["harmless"][p] for layer, p in pts.items()}
            self._memo[key] = AlphaSteer.fit(
                benign,
                {layer: self.fit["harmful"][p] for layer, p in pts.items()},
                {layer: self.refusal(p) for layer, p in pts.items()},
                ratio=self.ratio,
                alpha=self.alpha,
                hook_template=vector.hook_template,
                allow_rank_deficient=min(len(b) for b in benign.values()) < vector.vectors.shape[1],
            )
        return self._memo[key]

    def _rate(self, answers: list[str]) -> float:
        return float(np.mean(self.judge.judge(answers)))

    def _generate(
        self, prompts: Sequence[str], steerings: Composed, max_new_tokens: int | None = None
    ) -> list[str]:
        return generate(
            self.model,
            list(prompts),
            steering=_composition(steerings),
            strength=1.0,
            max_new_tokens=max_new_tokens or self.max_new_tokens,
            batch_size=self.batch_size,
            progress=False,
        )

    def _logits(self, prompts: Sequence[str], steerings: Composed) -> Tensor:
        return next_token_logits(
            self.model,
            list(prompts),
            steering=_composition(steerings),
            strength=1.0,
            batch_size=self.batch_size,
            progress=False,
        )

    def _run(self, steerings: Composed, gains: Sequence[str]) -> dict[str, float]:
        """Refusal rates, harmful first-token KL and log-odds, and the requested benign gains."""
        row: dict[str, float] = {}
        answers: list[str] = []
        for name, ps in self.sets.harmful.items():
            out = self._generate(ps, steerings)
            row[f"refusal_{name}"] = self._rate(out)
            answers += out
        row["refusal_harmful"] = self._rate(answers)
        row["refusal_jailbreak"] = self._rate(self._generate(self.sets.jailbreak, steerings))
        logits = self._logits(self.sets.pooled(), steerings)
        ref = self.vanilla_logits if self.vanilla_logits.numel() else logits
        ids = RefusalTokens.from_tokenizer(self.model.tokenizer).ids
        row["harmful_logodds"] = float(refusal_score(logits, ids).mean())
        row["harmful_kl"] = float(first_token_kl(ref, logits).mean())
        if "compliance" in gains:
            out = self._generate(self.sets.compliance, steerings)
            row["compliance_rate"] = 1.0 - self._rate(out)
        if "json" in gains:
            out = self._generate(self.sets.json, steerings, self.json_tokens)
            row["json_valid"] = float(np.mean([json_valid(t) for t in out]))
            row["json_opening"] = float(np.mean([json_opening(t) for t in out]))
        return row

    def geometry(self, steerings: Composed, probe: int) -> dict[str, float]:
        """:func:`margin_stats` of the pooled harmful prompts at residual point ``probe``."""
        steered = self.vanilla_acts[probe]
        if steerings:
            hook = point_hook(probe, int(self.model.cfg.n_layers))
            with steer(self.model, Composition(tuple(steerings)), 1.0):
                acts = cache_activations(
                    self.model, self.sets.pooled(), hooks=[hook], batch_size=self.batch_size,
                    progress=False,
                )  # fmt: skip
            steered = acts.tensors[hook]
        stats = margin_stats(
            self.fit["harmful"][probe],
            self.fit["harmless"][probe],
            self.vanilla_acts[probe],
            steered,
            self.refusal(probe),
        )
        return {k: stats[k] for k in ("shift", "margin", "margin_fraction", "above_boundary")}

    def audit(
        self,
        vector: ActAdd,
        strength: float = 1.0,
        *,
        name: str = "vector",
        mitigations: Sequence[str] = ("projected", "+alphasteer"),
        gains: Sequence[str] = ("compliance", "json"),
        reference: bool = False,
    ) -> AuditResult:
        """Measure ``vector`` at ``strength`` against the unsteered model, with ``mitigations``
        (``"projected"``, ``"+alphasteer"``); ``reference=True`` adds AlphaSteer alone."""
        lam = check_strength(strength)
        n = int(self.model.cfg.n_layers)
        points = [point_of(vector.hook_template, layer) for layer in vector.layers]
        probe = min(max(points) + 1, n)
        r = torch.stack([self.refusal(p) for p in points])
        cos = cosines(vector.vectors, r)
        projected = ActAdd(vector.layers, project_out(vector.vectors, r), vector.hook_template)
        conditions: dict[str, Composed] = {"with vector": [(vector, lam)]}
        for m in mitigations:
            if m == "projected":
                conditions["projected"] = [(projected, lam)]
            elif m == "+alphasteer":
                conditions["+alphasteer"] = [
                    (vector, lam),
                    (self.alphasteer(vector), self.alphasteer_strength),
                ]
            else:
                raise ValueError(f"unknown mitigation {m!r} (known: 'projected', '+alphasteer')")
        if reference:
            conditions["alphasteer only"] = [(self.alphasteer(vector), self.alphasteer_strength)]
        rows = [
            {"condition": "without vector", "strength": 0.0, **self.vanilla}
            | self.geometry([], probe)
        ]
        for cond, steerings in tqdm(conditions.items(), desc=name, disable=not self.progress):
            shared = cond == "alphasteer only"  # one reference row per hooks, with every gain
            row_gains = ("compliance", "json") if shared else tuple(gains)
            key = (cond, vector.hook_template, vector.layers, row_gains, probe)
            if not shared or key not in self._memo:
                self._memo[key] = self._run(steerings, row_gains) | self.geometry(steerings, probe)
            vector_lam = 0.0 if cond == "alphasteer only" else lam
            rows.append({"condition": cond, "strength": vector_lam, **self._memo[key]})
        table = pd.DataFrame(rows)
        cos_df = pd.DataFrame(
            {
                "layer": list(vector.layers),
                "hook": [vector.hook_name(layer) for layer in vector.layers],
                "norm": vector.vectors.double().norm(dim=-1).tolist(),
                "cosine": cos.tolist(),
                "cosine_projected": cosines(projected.vectors, r).tolist(),
            }
        )
        hook = point_hook(probe, n)
        return AuditResult(
            name, lam, hook, table, cos_df, audit_figure(table, cos_df, name, lam, hook),
            verdict(table, cos_df, name, lam),
        )  # fmt: skip


def audit(
    model: HookedModel,
    vector: ActAdd | Tensor,
    layers: Sequence[int] | None = None,
    strength: float = 1.0,
    *,
    sets: AuditSets,
    name: str = "vector",
    **kwargs: Any,
) -> AuditResult:
    """Audit one steering vector on ``model``: an :class:`ActAdd`, or a ``[len(layers), d_model]``
    tensor added at ``blocks.{l}.hook_resid_pre``. ``layers`` with an ActAdd keeps those rows.
    Other keyword arguments go to :class:`Auditor` (settings) or :meth:`Auditor.audit`."""
    if isinstance(vector, Tensor):
        if layers is None:
            raise ValueError("layers is required when the vector is a tensor")
        vector = ActAdd(tuple(layers), vector.float())
    elif layers is not None:
        missing = [layer for layer in layers if layer not in vector.layers]
        if missing:
            raise ValueError(f"layers {missing} are not in the vector (has {list(vector.layers)})")
        rows = torch.stack([vector.vectors[vector.layers.index(layer)] for layer in layers])
        vector = ActAdd(tuple(layers), rows, vector.hook_template)
    audit_keys = {"mitigations", "gains", "reference"}
    settings = {k: v for k, v in kwargs.items() if k not in audit_keys}
    options = {k: v for k, v in kwargs.items() if k in audit_keys}
    auditor = Auditor.create(model, sets, **settings)
    return auditor.audit(vector, strength, name=name, **options)
