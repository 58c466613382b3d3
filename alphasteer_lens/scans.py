"""SCANS: safety-conscious activation steering against over-refusal (Cao et al., AAAI 2025).

Three parts, each usable alone:

- **refusal vectors**: per layer, at ``blocks.{l}.hook_resid_post`` and the last prompt token,
  ``v_l = unit(mean(harmful) − mean(harmless))``;
- **layer anchoring by vocabulary projection**: the layers are cut into segments (former,
  middle, latter); the first principal component of each segment's vectors is read through the
  final norm and unembedding (:mod:`alphasteer_lens.logit_lens`), and the segment whose top
  tokens read most like refusal ("cannot", "sorry", ...) is steered;
- **harmfulness from the hidden-state transition**: with the assistant prefix " Sure",
  ``t_l = a_l(last prompt token) − a_l("Sure")``; ``d_l`` = mean ``t_l`` of harmful anchors;
  ``score = mean_l cos(t_l, d_l)``; harmful if ``score ≥ τ``.

Steering adds ``+α v_l`` to prompts judged harmful and ``−α v_l`` to the others, on the anchored
layers, from the end of the instruction onward, generated tokens included.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float
from torch import Tensor

from alphasteer_lens.activations import cache_activations
from alphasteer_lens.chat import encode_texts, model_format
from alphasteer_lens.directions import diff_in_means, unit
from alphasteer_lens.formats import PromptFormat
from alphasteer_lens.generation import generate
from alphasteer_lens.hookpoints import RESID_POST, hook_name
from alphasteer_lens.logit_lens import direction_logits
from alphasteer_lens.metrics import Scores, auroc
from alphasteer_lens.models import HookedModel
from alphasteer_lens.prompts import PromptSet
from alphasteer_lens.steering import ActAdd

SEGMENT_NAMES = ("former", "middle", "latter")
# Stems of refusal words. A token is refusal-like when its lower-cased letters start with a stem
# of four or more characters, or equal a shorter one (so "no" does not match "note").
REFUSAL_VOCAB: tuple[str, ...] = (
    "sorry", "cannot", "can't", "cant", "unable", "refus", "reject", "declin", "apolog",
    "illegal", "unethic", "inappropr", "harmful", "danger", "unsafe", "prohibit", "forbid",
    "against", "violat", "offens", "unlawful", "crim", "immoral", "won't", "wont", "never",
    "not", "no", "nor", "dont", "don't", "fail", "deny", "denied", "unfortunately", "regret",
    "caution", "warn", "risk",
)  # fmt: skip
Criterion = Literal["f1", "youden"]


# --- refusal vectors and layer anchoring ----------------------------------------------------


def refusal_vectors(
    harmful: Mapping[int, Tensor], harmless: Mapping[int, Tensor]
) -> dict[int, Float[Tensor, " d_model"]]:
    """Unit refusal vector per layer: ``v_l = unit(mean(harmful_l) − mean(harmless_l))``."""
    missing = sorted(set(harmful) ^ set(harmless))
    if missing:
        raise ValueError(f"layers {missing} are in only one of harmful / harmless activations")
    if not harmful:
        raise ValueError("no layers given")
    return {layer: unit(diff_in_means(harmful[layer], harmless[layer])) for layer in harmful}


def layer_segments(layers: Sequence[int], n_segments: int = 3) -> dict[str, tuple[int, ...]]:
    """Cut ``layers`` (in order) into ``n_segments`` contiguous, near-equal parts.

    Three parts are named former / middle / latter (the paper's split); other counts
    ``segment0``, ``segment1``, ...
    """
    layers = list(layers)
    if not 1 <= n_segments <= len(layers):
        raise ValueError(f"n_segments must be in [1, {len(layers)}] (the layers), got {n_segments}")
    names = SEGMENT_NAMES if n_segments == 3 else [f"segment{i}" for i in range(n_segments)]
    parts = np.array_split(np.asarray(layers), n_segments)
    return {name: tuple(int(x) for x in part) for name, part in zip(names, parts, strict=True)}


def first_principal_component(
    vectors: Float[Tensor, "n d_model"], *, center: bool = False
) -> Float[Tensor, " d_model"]:
    """Unit first principal component of the rows, signed so that ``pc · mean(rows) ≥ 0``.

    Uncentred by default: the top right singular vector of the stacked vectors, the one
    direction that best explains all of them. (Centring would remove exactly the direction the
    segment's vectors share and keep only how they differ.) Computed in float64.
    """
    if vectors.ndim != 2 or vectors.shape[0] == 0:
        raise ValueError(f"vectors must be a non-empty [n, d_model] tensor, got {vectors.shape}")
    x = vectors.double()
    if not torch.isfinite(x).all():
        raise ValueError("vectors contain NaN or inf")
    if center:
        x = x - x.mean(0, keepdim=True)
    _, s, vh = torch.linalg.svd(x, full_matrices=False)
    if float(s[0]) == 0.0:
        raise ValueError("vectors have no variance to take a principal component of")
    pc = vh[0]
    if float(pc @ vectors.double().mean(0)) < 0:
        pc = -pc
    return pc.float()


def _letters(token: str) -> str:
    return re.sub(r"[^a-z']", "", token.replace("\u2019", "'").lower())


def is_refusal_token(token: str, vocab: Sequence[str] = REFUSAL_VOCAB) -> bool:
    """Whether a decoded token reads as refusal (see :data:`REFUSAL_VOCAB` for the rule)."""
    word = _letters(token)
    if not word:
        return False
    return any(word == s or (len(s) >= 4 and word.startswith(s)) for s in vocab)


def _refusal_ids(tokenizer: Any, d_vocab: int, vocab: Sequence[str]) -> Tensor:
    ids = [i for i in range(d_vocab) if is_refusal_token(tokenizer.decode([i]), vocab)]
    return torch.tensor(ids, dtype=torch.long)


@dataclass(frozen=True)
class Anchoring:
    """The chosen segment, its layers, and per segment: ``segments`` (one row each: layers,
    ``hit_rate`` = share of refusal-like top-k tokens, ``z`` = mean z-score of all refusal-like
    vocabulary tokens' logits, ``top_tokens``) and ``tokens`` (long: segment, rank, token, ...)."""

    segment: str
    layers: tuple[int, ...]
    segments: pd.DataFrame
    tokens: pd.DataFrame


def anchor_layers(
    model: HookedModel,
    vectors: Mapping[int, Tensor],
    *,
    n_segments: int = 3,
    k: int = 20,
    vocab: Sequence[str] = REFUSAL_VOCAB,
    center: bool = False,
) -> Anchoring:
    """Choose the segment whose first principal component projects onto refusal tokens.

    Per segment: ``pc`` = :func:`first_principal_component` of its vectors, ``logits`` =
    ``U(N(pc)) − U(N(0))``; ``hit_rate`` = share of the top ``k`` tokens that are refusal-like.
    The segment with the highest hit rate wins; ties go to the higher ``z`` (mean standardised
    logit of every refusal-like token in the vocabulary), which also decides when no top token
    reads as refusal.
    """
    segs = layer_segments(sorted(vectors), n_segments)
    pcs = torch.stack(
        [first_principal_component(torch.stack([vectors[i] for i in s])) for s in segs.values()]
    )
    logits = direction_logits(model, pcs)
    d_vocab = logits.shape[1]
    if not 1 <= k <= d_vocab:
        raise ValueError(f"k must be in [1, {d_vocab}] (the vocabulary size), got {k}")
    ids = _refusal_ids(model.tokenizer, d_vocab, vocab)
    rows, token_rows = [], []
    for (name, layers), row in zip(segs.items(), logits, strict=True):
        z_all = (row - row.mean()) / row.std().clamp_min(1e-12)
        values, top = torch.topk(row, k)
        texts = [model.tokenizer.decode([int(t)]) for t in top.tolist()]
        hits = [is_refusal_token(t, vocab) for t in texts]
        rows.append(
            {
                "segment": name,
                "layers": list(layers),
                "hit_rate": float(np.mean(hits)),
                "z": float(z_all[ids].mean()) if len(ids) else 0.0,
                "top_tokens": texts,
                "refusal_tokens": [t for t, h in zip(texts, hits, strict=True) if h],
            }
        )
        for rank, (t, text, v, h) in enumerate(
            zip(top.tolist(), texts, values.tolist(), hits, strict=True)
        ):
            token_rows.append(
                {"segment": name, "rank": rank, "token_id": t, "token": text, "logit": v,
                 "refusal_like": h}
            )  # fmt: skip
    table = pd.DataFrame(rows)
    best = table.sort_values(["hit_rate", "z"], ascending=False, kind="stable").iloc[0]
    return Anchoring(str(best.segment), segs[str(best.segment)], table, pd.DataFrame(token_rows))


# --- harmfulness from the hidden-state transition -------------------------------------------


def prefix_offsets(
    model: HookedModel,
    prompt: str,
    prefix: str,
    *,
    system: str | None = None,
    prompt_format: PromptFormat | str | None = None,
) -> tuple[int, ...]:
    """Offsets from the end (negative) of the tokens ``prefix`` adds after the chat-formatted
    ``prompt``; the last prompt token sits at ``offsets[0] − 1``.

    Found by comparing the token ids with and without the prefix, so a tokenizer that merges
    the prefix into the template's last token still gets the right boundary (the first id that
    differs opens the prefix).
    """
    fmt = model_format(model, prompt_format, system, "")
    bare = encode_texts(model, [prompt], fmt)[1][0]
    full = encode_texts(model, [prompt], fmt.with_prefix(fmt.assistant_prefix + prefix))[1][0]
    common = 0
    while common < min(len(bare), len(full)) and bare[common] == full[common]:
        common += 1
    if common == len(full) or common == 0:
        raise ValueError(f"assistant prefix {prefix!r} adds no tokens after the prompt")
    return tuple(range(common - len(full), 0))


def _grouped_acts(
    model: HookedModel,
    prompts: Sequence[str],
    hooks: Sequence[str],
    prefix: str,
    positions_of: Any,
    *,
    system: str | None,
    prompt_format: PromptFormat | str | None = None,
    batch_size: int,
    progress: bool,
    desc: str,
) -> dict[str, Tensor]:
    """``[n, len(positions), d]`` per hook, prompts grouped by their positions tuple."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(positions_of(p), []).append(i)
    out: dict[str, Tensor] = {}
    for pos, idx in groups.items():
        acts = cache_activations(
            model,
            [prompts[i] for i in idx],
            hooks=hooks,
            positions=pos,
            assistant_prefix=prefix,
            system=system,
            prompt_format=prompt_format,
            batch_size=batch_size,
            progress=progress,
            desc=desc,
        )
        for h in hooks:
            if h not in out:
                out[h] = torch.empty(len(prompts), *acts[h].shape[1:])
            out[h][idx] = acts[h]
    return out


def transition_vectors(
    model: HookedModel,
    prompts: Sequence[str],
    *,
    layers: Sequence[int],
    prefix: str = " Sure",
    hook_template: str = RESID_POST,
    system: str | None = None,
    prompt_format: PromptFormat | str | None = None,
    batch_size: int = 16,
    progress: bool = True,
) -> Float[Tensor, "n layer d_model"]:
    """``t_l = a_l(last prompt token) − a_l(last token of prefix)`` per prompt and layer, from
    one forward pass over the chat-formatted prompt followed by the assistant ``prefix``."""
    prompts = list(prompts)
    if not prompts:
        raise ValueError("no prompts given")
    if not layers:
        raise ValueError("no layers given")

    def positions(p: str) -> tuple[int, int]:
        return (
            prefix_offsets(model, p, prefix, system=system, prompt_format=prompt_format)[0] - 1,
            -1,
        )

    hooks = [hook_name(hook_template, layer) for layer in layers]
    acts = _grouped_acts(
        model, prompts, hooks, prefix, positions, system=system, prompt_format=prompt_format,
        batch_size=batch_size, progress=progress, desc="transitions",
    )  # fmt: skip
    return torch.stack([acts[h][:, 0] - acts[h][:, 1] for h in hooks], dim=1)


def transition_scores(
    transitions: Float[Tensor, "n layer d_model"], reference: Float[Tensor, "layer d_model"]
) -> Float[Tensor, " n"]:
    """``score_i = (1/L) Σ_l cos(t_il, d_l)`` (float64)."""
    if transitions.ndim != 3 or transitions.shape[1:] != reference.shape:
        raise ValueError(
            f"transitions [n, layer, d] {tuple(transitions.shape)} do not match reference "
            f"[layer, d] {tuple(reference.shape)}"
        )
    t, d = transitions.double(), reference.double()
    norms = torch.linalg.vector_norm(t, dim=-1) * torch.linalg.vector_norm(d, dim=-1)
    if bool((norms == 0).any()):
        raise ValueError("a transition or reference vector is zero: its cosine is undefined")
    return ((t * d).sum(-1) / norms).mean(-1)


def classification_metrics(
    harmful_scores: Scores,
    benign_scores: Scores,
    threshold: float,
) -> dict[str, float]:
    """Harmful is the positive class, predicted when ``score ≥ threshold``: precision, recall,
    F1, accuracy, false-positive rate and the threshold-free AUROC."""
    pos = np.asarray(harmful_scores, dtype=np.float64).ravel()
    neg = np.asarray(benign_scores, dtype=np.float64).ravel()
    tp, fn = float((pos >= threshold).sum()), float((pos < threshold).sum())
    fp, tn = float((neg >= threshold).sum()), float((neg < threshold).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "threshold": float(threshold),
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "accuracy": (tp + tn) / (tp + tn + fp + fn),
        "fpr": fp / (fp + tn) if fp + tn else 0.0,
        "auroc": auroc(pos, neg),
        "n_harmful": float(pos.size),
        "n_benign": float(neg.size),
    }


def fit_threshold(
    harmful_scores: Scores,
    benign_scores: Scores,
    *,
    criterion: Criterion = "f1",
) -> float:
    """The τ that maximises F1 (harmful positive) or Youden's ``J = TPR − FPR``.

    Candidates are the midpoints between consecutive distinct scores (plus one below the
    lowest and one above the highest); the first, i.e. lowest, best candidate wins.
    """
    if criterion not in ("f1", "youden"):
        raise ValueError(f"criterion must be 'f1' or 'youden', got {criterion!r}")
    pos = np.asarray(harmful_scores, dtype=np.float64).ravel()
    neg = np.asarray(benign_scores, dtype=np.float64).ravel()
    if pos.size == 0 or neg.size == 0:
        raise ValueError("fitting τ needs harmful and benign scores")
    values = np.unique(np.concatenate([pos, neg]))
    cands = np.concatenate([[values[0] - 1.0], (values[1:] + values[:-1]) / 2, [values[-1] + 1.0]])
    best, best_value = float(cands[0]), -np.inf
    for tau in cands:
        m = classification_metrics(pos, neg, float(tau)) if criterion == "f1" else None
        value = m["f1"] if m else float((pos >= tau).mean() - (neg >= tau).mean())
        if value > best_value + 1e-12:
            best, best_value = float(tau), value
    return best


@dataclass(frozen=True)
class TransitionClassifier:
    """Harmfulness from the transition into " Sure": ``reference[i]`` is ``d_l`` for
    ``layers[i]`` (read at ``hook_template``); a prompt is harmful if ``score ≥ threshold``."""

    layers: tuple[int, ...]
    reference: Float[Tensor, "layer d_model"]
    threshold: float = 0.75
    prefix: str = " Sure"
    hook_template: str = RESID_POST

    @classmethod
    def fit(
        cls,
        harmful_transitions: Float[Tensor, "n layer d_model"],
        layers: Sequence[int],
        *,
        threshold: float = 0.75,
        prefix: str = " Sure",
        hook_template: str = RESID_POST,
    ) -> TransitionClassifier:
        """``d_l`` = mean transition of the harmful anchors."""
        if harmful_transitions.ndim != 3 or harmful_transitions.shape[1] != len(layers):
            raise ValueError(
                f"harmful transitions must be [n, {len(layers)}, d_model], got "
                f"{tuple(harmful_transitions.shape)}"
            )
        ref = harmful_transitions.double().mean(0).float()
        return cls(tuple(int(x) for x in layers), ref, float(threshold), prefix, hook_template)

    def transitions(
        self, model: HookedModel, prompts: Sequence[str], **kwargs: Any
    ) -> Float[Tensor, "n layer d_model"]:
        return transition_vectors(
            model, prompts, layers=self.layers, prefix=self.prefix,
            hook_template=self.hook_template, **kwargs,
        )  # fmt: skip

    def scores(self, transitions: Float[Tensor, "n layer d_model"]) -> Float[Tensor, " n"]:
        return transition_scores(transitions, self.reference)

    def predict(self, scores: Float[Tensor, " n"]) -> Bool[Tensor, " n"]:
        return scores >= self.threshold

    def calibrated(
        self, harmful_scores: Tensor, benign_scores: Tensor, *, criterion: Criterion = "f1"
    ) -> TransitionClassifier:
        """A copy whose τ is fitted on validation scores (:func:`fit_threshold`)."""
        tau = fit_threshold(harmful_scores, benign_scores, criterion=criterion)
        return replace(self, threshold=tau)


# --- bidirectional steering -----------------------------------------------------------------


def scans_strengths(harmful: Sequence[bool] | Tensor, alpha: float) -> list[float]:
    """Per prompt ``σ α``: ``σ = +1`` (toward refusal) if judged harmful, ``−1`` otherwise."""
    if not np.isfinite(alpha) or alpha < 0:
        raise ValueError(f"alpha must be finite and >= 0, got {alpha}")
    return [float(alpha) if bool(h) else -float(alpha) for h in harmful]


@dataclass(frozen=True)
class Scans:
    """Fitted SCANS: unit refusal ``vectors`` (row ``l`` = layer ``l``, at ``hook_resid_post``),
    the anchored layers, the transition classifier and the steering strength ``alpha``."""

    vectors: Float[Tensor, "n_layers d_model"]
    anchoring: Anchoring
    classifier: TransitionClassifier
    alpha: float

    @property
    def layers(self) -> tuple[int, ...]:
        return self.anchoring.layers

    def steering(self) -> ActAdd:
        """The anchored layers' vectors as an ActAdd at ``hook_resid_post`` (strength = ``±α``)."""
        return ActAdd(self.layers, self.vectors[list(self.layers)], RESID_POST)

    def classify(self, model: HookedModel, prompts: Sequence[str], **kwargs: Any) -> Tensor:
        """Transition scores of ``prompts`` (harmful if ``≥ classifier.threshold``)."""
        return self.classifier.scores(self.classifier.transitions(model, prompts, **kwargs))

    def generate(
        self,
        model: HookedModel,
        prompts: Sequence[str],
        *,
        max_new_tokens: int = 64,
        batch_size: int = 16,
        system: str | None = None,
        prompt_format: PromptFormat | str | None = None,
        progress: bool = True,
    ) -> pd.DataFrame:
        """Classify, then generate greedily with ``±α v`` from the instruction end onward
        (generated tokens included). Columns: prompt, score, harmful, strength, completion."""
        prompts = list(prompts)
        kw: dict[str, Any] = {
            "system": system, "prompt_format": prompt_format, "batch_size": batch_size,
            "progress": progress,
        }  # fmt: skip
        scores = self.classify(model, prompts, **kw)
        harmful = self.classifier.predict(scores)
        strengths = scans_strengths(harmful, self.alpha)
        completions = generate(
            model, prompts, steering=self.steering(), strength=strengths,
            positions="instruction_end", generated=True, max_new_tokens=max_new_tokens,
            desc="SCANS", **kw,
        )  # fmt: skip
        return pd.DataFrame(
            {"prompt": prompts, "score": scores.tolist(), "harmful": harmful.tolist(),
             "strength": strengths, "completion": completions}
        )  # fmt: skip

    @classmethod
    def fit(
        cls,
        model: HookedModel,
        harmful: Sequence[str],
        harmless: Sequence[str],
        *,
        alpha: float,
        n_segments: int = 3,
        k: int = 20,
        vocab: Sequence[str] = REFUSAL_VOCAB,
        segment: str | None = None,
        classifier_layers: Sequence[int] | None = None,
        threshold: float = 0.75,
        prefix: str = " Sure",
        system: str | None = None,
        prompt_format: PromptFormat | str | None = None,
        batch_size: int = 16,
        progress: bool = True,
    ) -> Scans:
        """Refusal vectors from the anchors (last prompt token, every layer), anchoring
        (``segment`` forces a segment by name), and the classifier's reference from the harmful
        anchors over ``classifier_layers`` (default: first anchored layer to the last layer, as
        the reference code does)."""
        n_layers = int(model.cfg.n_layers)
        hooks = [hook_name(RESID_POST, layer) for layer in range(n_layers)]
        kw: dict[str, Any] = {
            "system": system, "prompt_format": prompt_format, "batch_size": batch_size,
            "progress": progress,
        }  # fmt: skip
        h = cache_activations(model, list(harmful), hooks=hooks, desc="harmful anchors", **kw)
        b = cache_activations(model, list(harmless), hooks=hooks, desc="harmless anchors", **kw)
        vecs = refusal_vectors(h.by_layer(), b.by_layer())
        anchoring = anchor_layers(model, vecs, n_segments=n_segments, k=k, vocab=vocab)
        if segment is not None:
            segs = layer_segments(range(n_layers), n_segments)
            if segment not in segs:
                raise ValueError(f"segment {segment!r} is not one of {list(segs)}")
            anchoring = replace(anchoring, segment=segment, layers=segs[segment])
        layers = (
            list(range(anchoring.layers[0], n_layers))
            if classifier_layers is None
            else list(classifier_layers)
        )
        t = transition_vectors(model, list(harmful), layers=layers, prefix=prefix, **kw)
        clf = TransitionClassifier.fit(t, layers, threshold=threshold, prefix=prefix)
        stacked = torch.stack([vecs[layer] for layer in range(n_layers)])
        return cls(stacked, anchoring, clf, float(alpha))


def load_xstest(path: str | Path) -> tuple[PromptSet, PromptSet]:
    """(safe, unsafe) prompt sets from an XSTest-format CSV (columns id, prompt, type, label,
    focus, note; ``label`` is "safe" or "unsafe")."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"XSTest file not found: {path}")
    try:
        frame = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise ValueError(f"malformed CSV in {path}: {err}") from None
    missing = [c for c in ("prompt", "label") if c not in frame.columns]
    if missing:
        raise ValueError(f"{path}: XSTest CSV needs columns {missing}; has {list(frame.columns)}")
    labels = frame["label"].astype(str).str.strip().str.lower()
    unknown = sorted(set(labels) - {"safe", "unsafe"})
    if unknown:
        raise ValueError(f"{path}: label must be 'safe' or 'unsafe', found {unknown}")
    lic = "XSTest (CC BY 4.0)"
    out = []
    for label in ("safe", "unsafe"):
        rows = frame.loc[labels == label, "prompt"].astype(str).str.strip().tolist()
        out.append(PromptSet(f"xstest/{label}", tuple(rows), str(path), lic))
    return out[0], out[1]
