"""Metrics on plain inputs, each checked against hand-made cases in the tests.

- ``auroc``: area under the ROC curve (Mann–Whitney U, ties count ½);
- ``first_token_kl`` / ``token_kl``: ``KL(P_vanilla ‖ P_steered)`` in nats, at one position or
  at the first and averaged over the first ``k`` positions;
- ``sequence_nll`` / ``perplexity``: of reference answers under teacher forcing;
- ``extract_number`` / ``exact_match``: GSM8K-style answers;
- ``unchanged_fraction``: share of continuations equal to the vanilla ones;
- ``refusal_rate``: share of completions a judge calls refusals.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from decimal import Decimal, InvalidOperation
from typing import Any

import numpy as np
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from alphasteer_lens.judges import Judge, KeywordJudge

Scores = Sequence[float] | Tensor | np.ndarray


def auroc(positive: Scores, negative: Scores) -> float:
    """Area under the ROC curve of scores separating ``positive`` from ``negative`` rows:
    ``AUROC = (Σ ranks of positives − n₊(n₊+1)/2) / (n₊ n₋)`` (Mann–Whitney U; ties count ½)."""
    pos = np.asarray(positive, dtype=np.float64).ravel()
    neg = np.asarray(negative, dtype=np.float64).ravel()
    if pos.size == 0 or neg.size == 0:
        raise ValueError(f"AUROC needs both classes: got {pos.size} positive, {neg.size} negative")
    if not (np.isfinite(pos).all() and np.isfinite(neg).all()):
        raise ValueError("AUROC scores contain NaN or inf")
    scores = np.concatenate([pos, neg])
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(scores.size, dtype=np.float64)
    sorted_scores = scores[order]
    i = 0
    while i < scores.size:  # average ranks (1-based) over ties
        j = i
        while j + 1 < scores.size and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    u = ranks[: pos.size].sum() - pos.size * (pos.size + 1) / 2
    return float(u / (pos.size * neg.size))


def first_token_kl(
    p_logits: Float[Tensor, "n d_vocab"], q_logits: Float[Tensor, "n d_vocab"]
) -> Float[Tensor, " n"]:
    """Per row ``KL(P ‖ Q) = Σ_v P(v) (log P(v) − log Q(v))`` of the softmax distributions
    (float64, nats). ``P`` is the reference (vanilla), ``Q`` the steered model."""
    if p_logits.shape != q_logits.shape or p_logits.ndim != 2:
        raise ValueError(
            f"logits must be two [n, d_vocab] tensors of one shape, got "
            f"{tuple(p_logits.shape)} and {tuple(q_logits.shape)}"
        )
    log_p = torch.log_softmax(p_logits.double(), dim=-1)
    log_q = torch.log_softmax(q_logits.double(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).clamp(min=0.0)


def token_kl(
    p_logits: Float[Tensor, "n k d_vocab"],
    q_logits: Float[Tensor, "n k d_vocab"],
    mask: Bool[Tensor, "n k"],
) -> tuple[Float[Tensor, " n"], Float[Tensor, " n"]]:
    """Per row: ``KL(P_0 ‖ Q_0)`` at the first position and the mean of ``KL(P_j ‖ Q_j)`` over the
    positions ``j`` where ``mask`` is true (float64, nats). ``P`` is the reference model."""
    if p_logits.shape != q_logits.shape or p_logits.ndim != 3 or mask.shape != p_logits.shape[:2]:
        raise ValueError(
            f"token_kl needs logits [n, k, d_vocab] of one shape and a mask [n, k]; got "
            f"{tuple(p_logits.shape)}, {tuple(q_logits.shape)} and {tuple(mask.shape)}"
        )
    if not bool(mask[:, 0].all()):
        raise ValueError("every row needs at least its first position in the mask")
    n, k, v = p_logits.shape
    kl = first_token_kl(p_logits.reshape(n * k, v), q_logits.reshape(n * k, v)).reshape(n, k)
    m = mask.to(torch.float64)
    return kl[:, 0], (kl * m).sum(1) / m.sum(1)


def sequence_nll(
    logits: Float[Tensor, "n t d_vocab"], targets: Int[Tensor, "n t"], mask: Bool[Tensor, "n t"]
) -> tuple[Float[Tensor, " n"], Int[Tensor, " n"]]:
    """Per row: summed negative log-likelihood ``−Σ_j log softmax(logits_j)[targets_j]`` over the
    masked positions (float64, nats), and the number of positions counted. ``logits[:, j]`` is
    the distribution that predicts ``targets[:, j]``."""
    if logits.ndim != 3 or targets.shape != logits.shape[:2] or mask.shape != targets.shape:
        raise ValueError(
            f"sequence_nll needs logits [n, t, d_vocab], targets and mask [n, t]; got "
            f"{tuple(logits.shape)}, {tuple(targets.shape)} and {tuple(mask.shape)}"
        )
    logp = torch.log_softmax(logits.double(), dim=-1)
    nll = -logp.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)
    return (nll * mask).sum(1), mask.long().sum(1)


def perplexity(nll: Sequence[float] | Tensor, counts: Sequence[int] | Tensor) -> float:
    """Corpus perplexity ``exp(Σ NLL / Σ tokens)`` from per-row sums (see :func:`sequence_nll`)."""
    total = float(np.sum(np.asarray(counts, dtype=np.float64)))
    if total <= 0:
        raise ValueError("perplexity of zero tokens is undefined")
    return float(np.exp(np.sum(np.asarray(nll, dtype=np.float64)) / total))


_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def extract_number(text: str) -> str | None:
    """The answer number in ``text``, normalised (no commas, ``$`` or trailing zeros): the number
    after GSM8K's ``####`` marker if there is one, else the last number in the text."""
    tail = text.rsplit("####", 1)[1] if "####" in text else text
    found = _NUMBER.findall(tail)
    if not found:
        return None
    raw = found[0] if "####" in text else found[-1]
    try:
        value = Decimal(raw.replace(",", "").replace("$", ""))
    except InvalidOperation:
        return None
    value = value.normalize()
    return format(value.quantize(Decimal(1)) if value == value.to_integral() else value, "f")


def exact_match(predictions: Sequence[str], answers: Sequence[str]) -> float:
    """Share of predictions whose extracted number equals the answer's (:func:`extract_number`)."""
    if len(predictions) != len(answers) or not predictions:
        raise ValueError(f"{len(predictions)} predictions for {len(answers)} answers")
    hits = [
        extract_number(p) is not None and extract_number(p) == extract_number(a)
        for p, a in zip(predictions, answers, strict=True)
    ]
    return float(np.mean(hits))


def unchanged_fraction(steered: Sequence[Any], vanilla: Sequence[Any]) -> float:
    """Share of positions where the steered continuation equals the vanilla one exactly."""
    if len(steered) != len(vanilla) or not steered:
        raise ValueError(f"{len(steered)} steered continuations for {len(vanilla)} vanilla ones")
    return float(np.mean([a == b for a, b in zip(steered, vanilla, strict=True)]))


def refusal_rate(completions: Sequence[str], judge: Judge | None = None) -> float:
    """Share of completions the judge (default :class:`KeywordJudge`) calls refusals."""
    if not completions:
        raise ValueError("no completions to judge")
    return float(np.mean((judge or KeywordJudge()).judge(list(completions))))
