"""Evaluate steering methods side by side: refusal, utility, and distance from the vanilla model.

Metrics, per method, strength λ and prompt set (all greedy, all against the unsteered model):

- ``refusal_rate``: share of greedy answers the judge calls refusals (keyword judge by default);
- ``refusal_logodds``: mean log-odds of a refusal opening at the first generated token;
- ``first_token_kl`` / ``mean_kl``: ``KL(P_vanilla ‖ P_steered)`` (nats) at the first generated
  position, and averaged over the first ``k`` positions, both models reading the vanilla greedy
  continuation (teacher forcing, so the two distributions always condition on the same tokens);
- ``unchanged``: share of greedy continuations token-for-token equal to the vanilla ones;
- ``perplexity``: ``exp(Σ NLL / Σ tokens)`` of reference answers, for sets that have them;
- ``exact_match``: share of answers whose extracted number equals the reference (GSM8K style).

:func:`compare_methods` returns them as one tidy DataFrame (method, strength, prompt_set, metric,
value). It is resumable: every finished prompt is appended, one write per batch, to a JSONL file
keyed by a hash of model, method, strength, settings and prompt, and a rerun skips those prompts.
The metric functions live in :mod:`alphasteer_lens.metrics`; the tables, recommendation and
report built from the DataFrame in :mod:`alphasteer_lens.experiments.compare`.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float
from torch import Tensor
from tqdm.auto import tqdm

from alphasteer_lens.activations import cache_key
from alphasteer_lens.chat import ChatBatch, encode_chat
from alphasteer_lens.formats import PromptFormat, resolve_format
from alphasteer_lens.generation import greedy_batch, steering_context
from alphasteer_lens.judges import Judge, KeywordJudge, RefusalTokens, refusal_score
from alphasteer_lens.metrics import (
    exact_match,
    perplexity,
    refusal_rate,
    sequence_nll,
    token_kl,
    unchanged_fraction,
)
from alphasteer_lens.models import HookedModel
from alphasteer_lens.passes import SteerPositions as Positions
from alphasteer_lens.prompts import PromptSet
from alphasteer_lens.steering import Composition, Steering, check_strength
from alphasteer_lens.storage import tensors_hash

Role = Literal["harmful", "benign"]
METRICS = (
    "refusal_rate",
    "refusal_logodds",
    "first_token_kl",
    "mean_kl",
    "unchanged",
    "perplexity",
    "exact_match",
    "n",
)


# --- prompt sets and methods ----------------------------------------------------------------


@dataclass(frozen=True)
class EvalSet:
    """Prompts to evaluate on, their role, and optional reference answers (perplexity) and
    reference numbers (exact match). ``max_new_tokens`` overrides the run's generation length."""

    name: str
    prompts: tuple[str, ...]
    role: Role = "benign"
    references: tuple[str, ...] | None = None
    answers: tuple[str, ...] | None = None
    max_new_tokens: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "prompts", tuple(self.prompts))
        if not self.prompts:
            raise ValueError(f"eval set {self.name!r} is empty")
        if self.role not in ("harmful", "benign"):
            raise ValueError(f"eval set {self.name!r}: role must be 'harmful' or 'benign'")
        for what in ("references", "answers"):
            values = getattr(self, what)
            if values is not None:
                object.__setattr__(self, what, tuple(str(v) for v in values))
                if len(values) != len(self.prompts):
                    raise ValueError(
                        f"eval set {self.name!r}: {len(values)} {what} for "
                        f"{len(self.prompts)} prompts"
                    )

    def __len__(self) -> int:
        return len(self.prompts)

    def sample(self, n: int, *, seed: int = 0) -> EvalSet:
        """A deterministic subset of ``n`` rows (prompts with their references and answers)."""
        if not 0 < n <= len(self):
            raise ValueError(f"cannot sample {n} rows from eval set {self.name!r} ({len(self)})")
        return self.subset(random.Random(seed).sample(range(len(self)), n))

    def subset(self, rows: Sequence[int]) -> EvalSet:
        """The rows ``rows``, in that order (prompts with their references and answers)."""

        def pick(values: tuple[str, ...] | None) -> tuple[str, ...] | None:
            return None if values is None else tuple(values[i] for i in rows)

        return replace(
            self,
            prompts=tuple(self.prompts[i] for i in rows),
            references=pick(self.references),
            answers=pick(self.answers),
        )

    @classmethod
    def from_json(
        cls,
        path: str | Path,
        *,
        prompt: str,
        reference: str | None = None,
        answer: str | None = None,
        role: Role = "benign",
        name: str | None = None,
        limit: int | None = None,
        max_new_tokens: int | None = None,
    ) -> EvalSet:
        """A set from a JSON list of objects, e.g. alpaca_eval.json (``instruction``/``output``)
        or gsm8k_test_sampled.json (``problem``/``answer``)."""
        rows = json.loads(Path(path).read_text("utf-8"))[:limit]
        for i, row in enumerate(rows):
            missing = [c for c in (prompt, reference, answer) if c and c not in row]
            if missing:
                raise ValueError(f"{path}: row {i} has no field(s) {missing}")
        col = {c: tuple(str(r[c]) for r in rows) if c else None for c in (reference, answer)}
        return cls(
            name or Path(path).stem,
            tuple(str(r[prompt]).strip() for r in rows),
            role,
            col[reference] if reference else None,
            col[answer] if answer else None,
            max_new_tokens,
        )


def _as_eval_set(name: str, value: EvalSet | PromptSet | Sequence[str]) -> EvalSet:
    """Plain prompt sets are harmful when their key starts with "harmful" or "jailbreak"."""
    if isinstance(value, EvalSet):
        return value
    role: Role = "harmful" if name.startswith(("harmful", "jailbreak")) else "benign"
    return EvalSet(name, tuple(value), role)


@dataclass(frozen=True)
class Method:
    """A steering and where it acts: ``positions`` of the prompt, and (``generated=True``) the
    generated tokens too. ``steering=None`` is the vanilla model."""

    steering: Steering | Composition | None
    positions: Positions = "prompt"
    generated: bool = False

    def fingerprint(self) -> str:
        if self.steering is None:
            return "vanilla"
        s = self.steering
        if isinstance(s, Composition):
            inner = [[_steering_id(p), lam] for p, lam in s.parts]
            return json.dumps(["Composition", inner, self.positions, self.generated])
        tensors = {k: v for k, v in vars(s).items() if isinstance(v, Tensor)}
        parts = [type(s).__name__, list(s.layers), s.hook_template, self.positions, self.generated]
        return json.dumps([*parts, tensors_hash(tensors)])


def _steering_id(s: Any) -> list[Any]:
    tensors = {k: v for k, v in vars(s).items() if isinstance(v, Tensor)}
    return [type(s).__name__, list(s.layers), s.hook_template, tensors_hash(tensors)]


# --- resumable per-prompt results -----------------------------------------------------------


class ResultStore:
    """Per-prompt records in memory and, given a path, in a JSONL file that grows by one
    ``os.write`` per batch (O_APPEND). A torn last line from a killed run is ignored on load."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self.records: dict[str, dict[str, Any]] = {}
        if self.path is not None and self.path.exists():
            for line in self.path.read_text("utf-8").splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(rec, dict) and "key" in rec:
                    self.records[rec["key"]] = rec

    def __contains__(self, key: str) -> bool:
        return key in self.records

    def __getitem__(self, key: str) -> dict[str, Any]:
        return self.records[key]

    def append(self, records: Sequence[dict[str, Any]]) -> None:
        for rec in records:
            self.records[rec["key"]] = rec
        if self.path is None or not records:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records).encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            if os.fstat(fd).st_size and not self._ends_with_newline():
                data = b"\n" + data  # start after a torn line rather than extend it
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)

    def _ends_with_newline(self) -> bool:
        assert self.path is not None
        with open(self.path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            return f.read(1) == b"\n"


# --- running the model ----------------------------------------------------------------------


def greedy_tokens(
    model: HookedModel,
    batch: ChatBatch,
    method: Method,
    strength: float,
    max_new_tokens: int,
) -> list[list[int]]:
    """Greedy continuation token ids of one encoded batch under ``method``, cut before EOS."""
    return greedy_batch(
        model, batch, steering=method.steering, strength=strength, positions=method.positions,
        generated=method.generated, max_new_tokens=max_new_tokens,
    )  # fmt: skip


@torch.no_grad()
def forced_logits(
    model: HookedModel,
    batch: ChatBatch,
    continuations: Sequence[Sequence[int]],
    method: Method,
    strength: float,
) -> tuple[Float[Tensor, "n m d_vocab"], Bool[Tensor, "n m"]]:
    """Teacher forcing: logits at the positions that predict ``continuations[i][j]`` (the first
    one is the last prompt position), and which of them exist. Prompts stay left-padded and the
    continuations are right-padded, so every prompt ends at the same column (steering hooks
    read ``h_last`` there and steer only the prompt unless ``generated``)."""
    m = max(1, max(len(c) for c in continuations))
    n, p = batch.tokens.shape
    pad = model.tokenizer.pad_token_id or 0
    ext = torch.full((n, m - 1), pad, dtype=torch.long)
    ext_mask = torch.zeros((n, m - 1), dtype=torch.long)
    for i, c in enumerate(continuations):
        fed = list(c[: m - 1])
        ext[i, : len(fed)] = torch.tensor(fed, dtype=torch.long)
        ext_mask[i, : len(fed)] = 1
    device = batch.tokens.device
    tokens = torch.cat([batch.tokens, ext.to(device)], 1)
    attn = torch.cat([batch.attention_mask, ext_mask.to(device)], 1)
    with steering_context(
        model, method.steering, strength, batch, method.positions, method.generated
    ):
        logits = model(tokens, attention_mask=attn)
    valid = torch.tensor([[j < len(c) for j in range(m)] for c in continuations])
    return logits[:, p - 1 : p - 1 + m].float().cpu(), valid


# --- the comparison -------------------------------------------------------------------------


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def _forced_continuation(rec: dict[str, Any]) -> list[int]:
    """A record's greedy tokens as the model produced them: with the EOS it stopped at."""
    return list(rec["tokens"]) + ([rec["eos"]] if rec["eos"] is not None else [])


def _evaluate_batch(
    model: HookedModel,
    es: EvalSet,
    idx: list[int],
    run: tuple[Method, float],
    vanilla: list[list[int]] | None,
    refusal_ids: Sequence[int],
    settings: dict[str, Any],
    fmt: PromptFormat | None = None,
) -> list[dict[str, Any]]:
    """Records of one batch of one (method, λ). ``vanilla`` holds the vanilla continuations of
    these prompts (first ``kl_tokens``, EOS kept), or None when this is the vanilla run."""
    method, lam = run
    texts = [es.prompts[i] for i in idx]
    batch = encode_chat(model, texts, system=settings["system"], prompt_format=fmt).to(
        model.cfg.device
    )
    max_new = settings["max_new_tokens"]
    toks = greedy_tokens(model, batch, method, lam, max_new)
    eos = model.tokenizer.eos_token_id
    ended = [eos if eos is not None and len(t) < max_new else None for t in toks]
    if vanilla is None or settings.get("kl") is False:  # the first-token score only
        first = [(t + [e] if e is not None else t)[:1] for t, e in zip(toks, ended, strict=True)]
        q, _ = forced_logits(model, batch, first, method, lam)
        fill = 0.0 if vanilla is None else float("nan")
        kl0 = klm = torch.full((len(idx),), fill, dtype=torch.float64)
    else:
        q, mask = forced_logits(model, batch, vanilla, method, lam)
        p, _ = forced_logits(model, batch, vanilla, Method(None), 0.0)
        kl0, klm = token_kl(p, q, mask)
    logodds = refusal_score(q[:, 0], refusal_ids)
    nll: Tensor | None = None
    count: Tensor | None = None
    if es.references is not None:
        tok = model.tokenizer
        refs = [
            tok(es.references[i], add_special_tokens=False)["input_ids"][: settings["ref_tokens"]]
            for i in idx
        ]
        logits, rmask = forced_logits(model, batch, refs, method, lam)
        targets = torch.tensor([r + [0] * (rmask.shape[1] - len(r)) for r in refs])
        nll, count = sequence_nll(logits, targets, rmask)
    recs = []
    for row, i in enumerate(idx):
        rec = {
            "prompt_index": i,
            "tokens": toks[row],
            "eos": ended[row],
            "text": model.tokenizer.decode(toks[row], skip_special_tokens=True),
            "refusal_logodds": float(logodds[row]),
            "first_token_kl": float(kl0[row]),
            "mean_kl": float(klm[row]),
        }
        if nll is not None and count is not None:
            rec["nll"], rec["n_ref_tokens"] = float(nll[row]), int(count[row])
        recs.append(rec)
    return recs


def compare_methods(
    model: HookedModel,
    methods: Mapping[str, Steering | Composition | Method | None],
    strengths: Sequence[float] | Mapping[str, Sequence[float]],
    prompt_sets: Mapping[str, EvalSet | PromptSet | Sequence[str]],
    *,
    judge: Judge | None = None,
    max_new_tokens: int = 32,
    kl_tokens: int = 8,
    ref_tokens: int = 64,
    batch_size: int = 16,
    system: str | None = None,
    prompt_format: PromptFormat | str | None = None,
    kl: bool = True,
    seed: int = 0,
    cache: str | Path | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Every method at every strength on every prompt set, measured against the vanilla model.

    ``methods`` maps a name to a steering (applied at the prompt positions), a :class:`Method`
    (choose the positions, or steer generated tokens too), or ``None`` for the vanilla model.
    The vanilla model is always evaluated, once at strength 0, since every other row is measured
    against it. ``prompt_sets`` maps a name to an :class:`EvalSet` or plain prompts (role
    "harmful" when the name starts with "harmful" or "jailbreak"). ``cache`` names a JSONL file
    that makes the run resumable. ``strengths`` is one λ list for every method, or a mapping
    from method name to its own list. ``kl=False`` skips the teacher-forced KL passes (the KL
    metrics are then NaN). Returns a tidy frame (method, strength, prompt_set, metric, value)
    with ``attrs["roles"]`` (set name → role), ``attrs["settings"]`` and
    ``attrs["generations"]`` (one row per method, strength, prompt set and prompt: the greedy
    text and the judge's call).
    """
    if not methods or not prompt_sets:
        raise ValueError("compare_methods needs at least one method and one prompt set")
    steered = [n for n, m in methods.items() if m is not None]
    if isinstance(strengths, Mapping):
        missing = sorted(set(steered) - set(strengths))
        if missing:
            raise ValueError(f"no strengths for method(s) {missing}")
        per = {n: [check_strength(x) for x in strengths[n]] for n in steered}
    else:
        lams = [check_strength(x) for x in strengths]
        if not lams:
            raise ValueError("strengths is empty")
        per = {n: lams for n in steered}
    if any(not v for v in per.values()):
        raise ValueError(f"empty strength list for {[n for n, v in per.items() if not v]}")
    if min(max_new_tokens, kl_tokens, ref_tokens, batch_size) < 1:
        raise ValueError("max_new_tokens, kl_tokens, ref_tokens and batch_size must all be >= 1")
    torch.manual_seed(seed)
    judge = judge or KeywordJudge()
    sets = [_as_eval_set(name, v) for name, v in prompt_sets.items()]
    vanilla_name = next((n for n, m in methods.items() if m is None), "vanilla")
    runs: list[tuple[str, Method, float]] = [(vanilla_name, Method(None), 0.0)]
    for name, m in methods.items():
        if m is not None:
            meth = m if isinstance(m, Method) else Method(m)
            runs += [(name, meth, lam) for lam in per[name]]
    store = ResultStore(cache)
    model_fp = cache_key(model, [], [], "", "evaluation")
    refusal_ids = RefusalTokens.from_tokenizer(model.tokenizer).ids
    fmt = None if prompt_format is None else resolve_format(model.tokenizer, prompt_format)
    rows: list[dict[str, Any]] = []
    texts: list[dict[str, Any]] = []
    for es in sets:
        settings: dict[str, Any] = {
            "max_new_tokens": es.max_new_tokens or max_new_tokens,
            "kl_tokens": kl_tokens,
            "ref_tokens": ref_tokens,
            "system": system,
        }
        if fmt is not None:  # only then, so caches written before this option stay valid
            settings["prompt_format"] = fmt.to_json()
        if not kl:
            settings["kl"] = False
        vanilla: list[list[int]] = []
        for name, meth, lam in runs:
            keys = [
                _key(model_fp, meth.fingerprint(), lam, settings, p, ref)
                for p, ref in zip(es.prompts, es.references or [None] * len(es), strict=True)
            ]
            todo = sorted(
                (i for i, k in enumerate(keys) if k not in store), key=lambda i: len(es.prompts[i])
            )
            batches = [todo[j : j + batch_size] for j in range(0, len(todo), batch_size)]
            for idx in tqdm(
                batches, desc=f"{name} λ={lam:g} {es.name}", disable=not progress, leave=False
            ):
                van = [vanilla[i][:kl_tokens] for i in idx] if meth.steering is not None else None
                recs = _evaluate_batch(model, es, idx, (meth, lam), van, refusal_ids, settings, fmt)
                for rec in recs:
                    rec["key"] = keys[rec["prompt_index"]]
                store.append(recs)
            recs = [store[k] for k in keys]
            if meth.steering is None:
                vanilla = [_forced_continuation(r) for r in recs]
            rows += _aggregate(name, lam, es, recs, vanilla, judge)
            refused = judge.judge([r["text"] for r in recs])
            texts += [
                {"method": name, "strength": lam, "prompt_set": es.name, "prompt_index": i,
                 "prompt": es.prompts[i], "text": r["text"], "refused": bool(flag)}
                for i, (r, flag) in enumerate(zip(recs, refused, strict=True))
            ]  # fmt: skip
    df = pd.DataFrame(rows, columns=["method", "strength", "prompt_set", "metric", "value"])
    df.attrs["roles"] = {es.name: es.role for es in sets}
    df.attrs["settings"] = {
        "max_new_tokens": max_new_tokens, "kl_tokens": kl_tokens, "kl": kl, "seed": seed,
    }  # fmt: skip
    df.attrs["generations"] = pd.DataFrame(texts)
    return df


def _aggregate(
    method: str,
    strength: float,
    es: EvalSet,
    recs: list[dict[str, Any]],
    vanilla: list[list[int]],
    judge: Judge,
) -> list[dict[str, Any]]:
    texts = [r["text"] for r in recs]
    values: dict[str, float] = {
        "refusal_rate": refusal_rate(texts, judge),
        "refusal_logodds": float(np.mean([r["refusal_logodds"] for r in recs])),
        "first_token_kl": float(np.mean([r["first_token_kl"] for r in recs])),
        "mean_kl": float(np.mean([r["mean_kl"] for r in recs])),
        "unchanged": unchanged_fraction([_forced_continuation(r) for r in recs], vanilla),
    }
    if es.references is not None:
        values["perplexity"] = perplexity(
            [r["nll"] for r in recs], [r["n_ref_tokens"] for r in recs]
        )
    if es.answers is not None:
        values["exact_match"] = exact_match(texts, es.answers)
    values["n"] = float(len(recs))
    return [
        {"method": method, "strength": strength, "prompt_set": es.name, "metric": m, "value": v}
        for m, v in values.items()
    ]
