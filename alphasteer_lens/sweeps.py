"""Layer, strength and null-space-ratio sweeps, returned as pandas DataFrames.

Every sweep evaluates a steering on a harmful and a benign prompt set in one of two modes:

- ``"logit"``: one forward pass per prompt. Refusal score = log-odds that the first generated
  token opens a refusal (:func:`~alphasteer_lens.judges.refusal_score`); a prompt counts as
  refused when its log-odds are > 0. Cheap enough for full layer sweeps on a CPU.
- ``"generation"``: greedy continuations judged by :class:`~alphasteer_lens.judges.KeywordJudge`.
  The logit-level columns are reported as well (they cost one more forward pass), so one
  generation sweep shows whether the two modes rank layers the same way.

Columns of every sweep: ``harmful_score`` / ``benign_score`` (mean refusal log-odds),
``harmful_refusal_logit`` / ``benign_refusal_logit`` (fraction with log-odds > 0), ``benign_kl``
(mean ``KL(P_vanilla ‖ P_steered)`` of the benign first-token distribution, nats) and
``benign_top1_unchanged`` (fraction of benign prompts whose most likely first token is
unchanged). Generation mode adds ``harmful_refusal_gen`` / ``benign_refusal_gen`` (keyword
judge) and ``benign_unchanged`` (fraction of benign continuations identical to the vanilla
ones). ``harmful_refusal`` / ``benign_refusal`` are the refusal rates of the sweep's ``mode``.
``df.attrs["vanilla"]`` holds the same metrics for the unsteered model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from alphasteer_lens.activations import Activations, cache_activations
from alphasteer_lens.alphasteer import AlphaSteer
from alphasteer_lens.directions import diff_in_means
from alphasteer_lens.generation import generate, next_token_logits
from alphasteer_lens.hookpoints import RESID_PRE, hook_name
from alphasteer_lens.judges import KeywordJudge, RefusalTokens, refusal_score
from alphasteer_lens.metrics import auroc, first_token_kl
from alphasteer_lens.models import HookedModel
from alphasteer_lens.steering import ActAdd, Steering, check_strength

Mode = Literal["logit", "generation"]
MODES: tuple[str, ...] = ("logit", "generation")


def projection_auroc(
    harmful: Float[Tensor, "nh d_model"],
    harmless: Float[Tensor, "nb d_model"],
    direction: Float[Tensor, " d_model"],
) -> float:
    """Direction quality: AUROC of the projections ``h·r̂`` separating harmful from harmless."""
    r = direction.double()
    if float(r.norm()) == 0.0:
        raise ValueError("direction is the zero vector")
    r = r / r.norm()
    return auroc(harmful.double() @ r, harmless.double() @ r)


@dataclass(frozen=True)
class Evaluator:
    """Evaluates steerings on fixed harmful and benign prompts, against the vanilla model.

    Build it with :meth:`create` (which runs the vanilla model once); then each
    :meth:`evaluate` call runs only the steered model.
    """

    model: HookedModel
    harmful: tuple[str, ...]
    benign: tuple[str, ...]
    mode: Mode
    refusal_ids: tuple[int, ...]
    judge: KeywordJudge
    max_new_tokens: int
    batch_size: int
    benign_logits: Tensor
    benign_texts: tuple[str, ...] | None
    vanilla: dict[str, float]

    @classmethod
    def create(
        cls,
        model: HookedModel,
        harmful: Sequence[str],
        benign: Sequence[str],
        *,
        mode: Mode = "logit",
        refusal_ids: Sequence[int] | None = None,
        judge: KeywordJudge | None = None,
        max_new_tokens: int = 16,
        batch_size: int = 16,
    ) -> Evaluator:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if not harmful or not benign:
            raise ValueError("both harmful and benign prompt sets must be non-empty")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        ids = tuple(refusal_ids or RefusalTokens.from_tokenizer(model.tokenizer).ids)
        unset = cls(
            model,
            tuple(harmful),
            tuple(benign),
            mode,
            ids,
            judge or KeywordJudge(),
            max_new_tokens,
            batch_size,
            benign_logits=torch.empty(0),
            benign_texts=None,
            vanilla={},
        )
        metrics, logits, texts = unset._run(None, 0.0)
        return replace(unset, benign_logits=logits, benign_texts=texts, vanilla=metrics)

    def _run(
        self, steering: Steering | None, strength: float
    ) -> tuple[dict[str, float], Tensor, tuple[str, ...] | None]:
        kw: dict[str, Any] = {
            "steering": steering,
            "strength": strength,
            "batch_size": self.batch_size,
            "progress": False,
        }
        h_logits = next_token_logits(self.model, self.harmful, **kw)
        b_logits = next_token_logits(self.model, self.benign, **kw)
        h_score = refusal_score(h_logits, self.refusal_ids)
        b_score = refusal_score(b_logits, self.refusal_ids)
        ref = self.benign_logits if self.benign_logits.numel() else b_logits
        out = {
            "harmful_score": float(h_score.mean()),
            "benign_score": float(b_score.mean()),
            "harmful_refusal_logit": float((h_score > 0).double().mean()),
            "benign_refusal_logit": float((b_score > 0).double().mean()),
            "benign_kl": float(first_token_kl(ref, b_logits).mean()),
            "benign_top1_unchanged": float((ref.argmax(-1) == b_logits.argmax(-1)).double().mean()),
        }
        texts: tuple[str, ...] | None = None
        if self.mode == "generation":
            gen = {
                name: generate(self.model, ps, max_new_tokens=self.max_new_tokens, **kw)
                for name, ps in (("harmful", self.harmful), ("benign", self.benign))
            }
            texts = tuple(gen["benign"])
            out["harmful_refusal_gen"] = float(np.mean(self.judge.judge(gen["harmful"])))
            out["benign_refusal_gen"] = float(np.mean(self.judge.judge(gen["benign"])))
            ref_texts = self.benign_texts if self.benign_texts is not None else texts
            out["benign_unchanged"] = float(
                np.mean([a == b for a, b in zip(texts, ref_texts, strict=True)])
            )
        suffix = "_gen" if self.mode == "generation" else "_logit"
        out["harmful_refusal"] = out["harmful_refusal" + suffix]
        out["benign_refusal"] = out["benign_refusal" + suffix]
        return out, b_logits, texts

    def evaluate(self, steering: Steering | None, strength: float = 1.0) -> dict[str, float]:
        """Metrics of ``steering`` at ``strength`` (see the module docstring). ``None`` or
        λ = 0 is the vanilla model and returns :attr:`vanilla` without running it again."""
        lam = check_strength(strength)
        if steering is None or lam == 0.0:
            return dict(self.vanilla)
        return self._run(steering, lam)[0]


def layer_sweep(
    model: HookedModel,
    fit_harmful: Sequence[str] | Activations,
    fit_harmless: Sequence[str] | Activations,
    eval_harmful: Sequence[str],
    eval_harmless: Sequence[str],
    *,
    layers: Sequence[int] | None = None,
    strength: float = 1.0,
    mode: Mode = "logit",
    hook_template: str = RESID_PRE,
    max_new_tokens: int = 16,
    batch_size: int = 16,
    refusal_ids: Sequence[int] | None = None,
    judge: KeywordJudge | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Per layer ``l``: the difference-in-means direction ``r_l`` (fit prompts), its quality
    on held-out prompts (``auroc`` of ``h·r̂_l``, harmful vs harmless), and what steering with
    ActAdd ``h + λ r_l`` at that single layer does to the eval prompts (induced refusal on the
    harmful set, refusal and first-token KL on the harmless set).

    ``fit_harmful`` / ``fit_harmless`` may be prompts or already cached last-token
    :class:`~alphasteer_lens.activations.Activations` holding every swept hook.

    One row per layer; columns ``layer, hook, mode, strength, direction_norm, auroc`` and the
    evaluation columns of the module docstring. ``auroc`` is NaN where the direction is zero
    (e.g. layer 0 at the last token, which is the same template token for every prompt).
    """
    lam = check_strength(strength)
    chosen = list(range(int(model.cfg.n_layers))) if layers is None else list(layers)
    if not chosen:
        raise ValueError("layers is empty")
    hooks = [hook_name(hook_template, layer) for layer in chosen]

    def acts(ps: Sequence[str] | Activations, what: str) -> dict[str, Tensor]:
        if isinstance(ps, Activations):
            missing = [h for h in hooks if h not in ps.tensors]
            if missing or ps.positions != "last":
                raise ValueError(
                    f"{what} activations must be last-token and hold every swept hook; "
                    f"positions={ps.positions!r}, missing {missing}"
                )
            return ps.tensors
        if not ps:
            raise ValueError(f"{what} prompt set is empty")
        cached = cache_activations(
            model, list(ps), hooks=hooks, batch_size=batch_size, progress=progress, desc=what
        )
        return cached.tensors

    fh, fb = acts(fit_harmful, "fit harmful"), acts(fit_harmless, "fit harmless")
    eh, eb = acts(eval_harmful, "eval harmful"), acts(eval_harmless, "eval harmless")
    ev = Evaluator.create(
        model,
        eval_harmful,
        eval_harmless,
        mode=mode,
        refusal_ids=refusal_ids,
        judge=judge,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
    )
    rows = []
    for layer, hook in tqdm(
        list(zip(chosen, hooks, strict=True)), desc="layer sweep", disable=not progress
    ):
        r = diff_in_means(fh[hook], fb[hook])
        steering = ActAdd((layer,), r[None, :], hook_template=hook_template)
        rows.append(
            {
                "layer": layer,
                "hook": hook,
                "mode": mode,
                "strength": lam,
                "direction_norm": float(r.double().norm()),
                "auroc": projection_auroc(eh[hook], eb[hook], r) if r.any() else float("nan"),
                **ev.evaluate(steering, lam),
            }
        )
    df = pd.DataFrame(rows)
    df.attrs["vanilla"] = dict(ev.vanilla)
    return df


def strength_sweep(
    evaluator: Evaluator,
    steerings: Mapping[str, Steering],
    strengths: Sequence[float],
    *,
    progress: bool = True,
) -> pd.DataFrame:
    """One row per ``(method, strength)``: the evaluator's metrics of each steering at each λ.
    A safety-vs-utility trade-off curve per method (λ = 0 is the vanilla model)."""
    if not steerings or not strengths:
        raise ValueError("need at least one steering and one strength")
    grid = [(name, check_strength(lam)) for name in steerings for lam in strengths]
    rows = [
        {"method": name, "strength": lam, **evaluator.evaluate(steerings[name], lam)}
        for name, lam in tqdm(grid, desc="strength sweep", disable=not progress)
    ]
    df = pd.DataFrame(rows)
    df.attrs["vanilla"] = dict(evaluator.vanilla)
    return df


def ratio_sweep(
    evaluator: Evaluator,
    benign: Mapping[int, Tensor],
    malicious: Mapping[int, Tensor],
    refusal: Mapping[int, Tensor],
    ratios: Sequence[float],
    *,
    layers: Sequence[int],
    strength: float = 1.0,
    alpha: float = 10.0,
    progress: bool = True,
) -> pd.DataFrame:
    """AlphaSteer refit at each null-space ratio ``k/d`` and evaluated at ``strength``.

    One row per ratio: ``ratio, strength, alpha, leakage`` (mean benign leakage ``‖Hb P‖/‖Hb‖``
    over the steered layers) and the evaluator's metrics.
    """
    if not ratios:
        raise ValueError("ratios is empty")
    lam = check_strength(strength)
    rows = []
    for ratio in tqdm(list(ratios), desc="ratio sweep", disable=not progress):
        steering = AlphaSteer.fit(
            benign, malicious, refusal, layers=layers, ratio=float(ratio), alpha=alpha
        )
        rows.append(
            {
                "method": "alphasteer",
                "ratio": float(ratio),
                "strength": lam,
                "alpha": float(alpha),
                "leakage": float(np.mean(steering.leakage)),
                **evaluator.evaluate(steering, lam),
            }
        )
    df = pd.DataFrame(rows)
    df.attrs["vanilla"] = dict(evaluator.vanilla)
    return df


def rank_agreement(
    df: pd.DataFrame, a: str = "harmful_score", b: str = "harmful_refusal_gen"
) -> float:
    """Spearman rank correlation of columns ``a`` and ``b`` (e.g. a generation-mode layer sweep's
    logit-level score vs its keyword-judge refusal rate): do the two modes order rows alike?"""
    from scipy.stats import spearmanr

    for col in (a, b):
        if col not in df.columns:
            raise ValueError(f"column {col!r} not in DataFrame (columns: {list(df.columns)})")
    if len(df) < 3:
        raise ValueError(f"rank agreement needs at least 3 rows, got {len(df)}")
    rho = spearmanr(df[a].to_numpy(), df[b].to_numpy()).statistic
    return float(rho)
