"""SCANS end to end on any chat model (``alphasteer-lens scans``; default the embedded SmolLM2).

Data (seeded, disjoint splits):
- harmful anchors: 32 HarmBench + 32 Do-Not-Answer prompts (the model refuses some of the
  latter, so their mean carries refusal; HarmBench alone gives a "write a document" direction
  here); the transition reference ``d_l`` uses the HarmBench half only (Do-Not-Answer's short
  questions move into " Sure" unlike HarmBench's requests: AUROC 0.54 with them, measured);
  harmful validation and test: other HarmBench prompts;
- harmless anchors: the built-in benign set; plain benign test: MT-Bench turn 1;
- benign but sensitive: the data directory's ``alphasteer/borderline_val`` (``query``) and
  ``alphasteer/coconot_pref`` (``prompt``) prompts, or ``sensitive=FILE``, or, when neither
  exists, the package's own small XSTest-style set (``sensitive_benign``; a note says so).

Steps: :meth:`Scans.fit` on 64 + 64 anchors (refusal vectors, anchoring, transition reference);
τ calibrated on validation harmful vs sensitive prompts; classifier metrics on the test sets;
greedy generation, judged by :class:`KeywordJudge`, in four conditions: vanilla, SCANS, induced
over-refusal (ActAdd of the refusal vectors at ``layers``, prompt positions; chosen on
validation data when not given) and induced
over-refusal with SCANS on top. The model barely refuses by itself, so the over-refusal side of
SCANS can only be shown on an over-refusing variant of it.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

import pandas as pd

from alphasteer_lens import prompts as P
from alphasteer_lens.experiments import recipe as R
from alphasteer_lens.experiments.config import ConfigError, RunConfig
from alphasteer_lens.experiments.data import Data
from alphasteer_lens.experiments.layers import LayerChoice, candidate_layers, choose_layers
from alphasteer_lens.experiments.manifest import write_manifest
from alphasteer_lens.experiments.report import Clock, markdown_table, peak_rss_mib
from alphasteer_lens.generation import generate
from alphasteer_lens.judges import KeywordJudge
from alphasteer_lens.models import HookedModel, model_name
from alphasteer_lens.prompts import PromptSet
from alphasteer_lens.scans import (
    RESID_POST,
    Criterion,
    Scans,
    TransitionClassifier,
    classification_metrics,
    scans_strengths,
)
from alphasteer_lens.steering import ActAdd, steer
from alphasteer_lens.storage import atomic_write_bytes, atomic_write_json

CONDITIONS = ("vanilla", "scans", "over_refusal", "over_refusal+scans")
PROMPT_SETS = ("harmful", "sensitive", "benign")


@dataclass(frozen=True)
class ScansConfig(RunConfig):
    """SCANS' own settings: anchors per side, test prompts per set, the steering magnitude
    ``steer_alpha`` (±α v_l), the τ rule, and the induced over-refusal ActAdd (``+λ v_l`` at
    ``hook_resid_post``, prompt positions, at the base config's ``layers``; chosen on validation
    data when None). ``n_val`` (base) is per class for τ."""

    n_anchors: int = 64  # per side, the paper's 64 + 64
    n_test: int = 48  # per prompt set
    steer_alpha: float = 20.0
    criterion: Criterion = "youden"  # τ rule; Youden's J weighs false refusals as misses
    induce_strength: float = 15.0
    sensitive: str | None = None

    QUICK: ClassVar[dict[str, Any]] = {
        "n_anchors": 16, "n_val": 8, "n_test": 6, "max_new_tokens": 8, "n_select": 8,
    }  # fmt: skip

    def __post_init__(self) -> None:
        super().__post_init__()
        check_chat(self)
        if self.steer_alpha < 0 or self.induce_strength < 0:
            raise ConfigError(
                f"steer_alpha and induce_strength must be >= 0, got {self.steer_alpha}, "
                f"{self.induce_strength}"
            )


def _slices(ps: PromptSet, sizes: Sequence[int], seed: int) -> list[PromptSet]:
    """Disjoint, seeded parts of ``ps`` of the given sizes."""
    ps = ps.deduplicated()
    if sum(sizes) > len(ps):
        raise ValueError(f"{ps.name!r} has {len(ps)} prompts; {list(sizes)} are needed")
    shuffled = ps.sample(len(ps), seed=seed)
    ends = [sum(sizes[: i + 1]) for i in range(len(sizes))]
    return [shuffled[end - n : end] for n, end in zip(sizes, ends, strict=True)]


def sensitive_prompts(
    path: str | Path | None = None, data: Data | None = None
) -> tuple[PromptSet, str]:
    """Benign-but-sensitive prompts and a note saying where they came from: ``path`` if given,
    else the data directory's borderline + CoCoNot prompts, else the package's XSTest-style
    fallback (the note names the missing sets)."""
    if path is not None:
        ps = P.load_prompts(path)
        return ps, f"sensitive prompts from {path}"
    data = data if data is not None else Data()
    found = len(data.notes)
    border = data.optional("alphasteer/borderline_val", column="query")
    coconot = data.optional("alphasteer/coconot_pref", column="prompt")
    if border is None or coconot is None:
        missing = "; ".join(data.notes[found:])
        ps = data.prompts("sensitive_benign")
        note = (
            f"{missing}; using the built-in XSTest-style set of {len(ps)} prompts instead "
            "(pass --sensitive FILE for your own)"
        )
        return ps, note
    ps = PromptSet.concat(
        "borderline+coconot", border.deduplicated(), coconot.deduplicated()
    ).deduplicated()
    return ps, "sensitive prompts: borderline_val (query) + coconot_pref (prompt)"


def _data(cfg: ScansConfig, data: Data) -> tuple[dict[str, PromptSet], str]:
    n_hb = cfg.n_anchors // 2
    hb = data.prompts("harmbench")
    hb_anchors, val_h, test_h = _slices(hb, (n_hb, cfg.n_val, cfg.n_test), cfg.seed)
    (dna_anchors,) = _slices(data.prompts("do_not_answer"), (cfg.n_anchors - n_hb,), cfg.seed)
    anchors_h = PromptSet.concat("harmbench+do_not_answer", hb_anchors, dna_anchors)
    n_b = min(cfg.n_select, len(data.prompts("builtin_benign").deduplicated()) - cfg.n_anchors)
    anchors_b, val_b = _slices(data.prompts("builtin_benign"), (cfg.n_anchors, n_b), cfg.seed)
    mt = data.prompts("mt_bench")
    (test_b,) = _slices(mt, (min(cfg.n_test, len(mt.deduplicated())),), cfg.seed)
    sens, note = sensitive_prompts(cfg.sensitive, data)
    half = len(sens.deduplicated()) // 2
    val_s, test_s = _slices(sens, (min(cfg.n_val, half), min(cfg.n_test, half)), cfg.seed)
    sets = {
        "anchors_harmful": anchors_h,
        "anchors_harmless": anchors_b,
        "anchors_transition": hb_anchors,
        "val_harmful": val_h,
        "val_benign": val_b,
        "val_sensitive": val_s,
        "harmful": test_h,
        "sensitive": test_s,
        "benign": test_b,
    }
    return sets, note


def _complete(
    model: HookedModel,
    prompts: Sequence[str],
    cfg: ScansConfig,
    *,
    scans: Scans | None,
    harmful: Sequence[bool],
    induce: ActAdd | None,
    progress: bool,
    desc: str,
) -> list[str]:
    """Greedy completions, one batch per :func:`generate` call so that the induced
    over-refusal (an outer :func:`steer` context, prompt positions) meets one prompt length."""
    out: list[str] = []
    for i in range(0, len(prompts), cfg.batch_size):
        chunk = list(prompts[i : i + cfg.batch_size])
        kw: dict[str, Any] = {}
        if scans is not None:
            kw = {
                "steering": scans.steering(),
                "strength": scans_strengths(harmful[i : i + cfg.batch_size], scans.alpha),
                "positions": "instruction_end",
                "generated": True,
            }
        ctx = (
            steer(model, induce, cfg.induce_strength, positions="prompt")
            if induce is not None
            else nullcontext(model)
        )
        with ctx:
            out += generate(
                model, chunk, max_new_tokens=cfg.max_new_tokens, batch_size=len(chunk),
                progress=progress, desc=desc, **kw,
            )  # fmt: skip
    return out


def refusal_table(
    completions: dict[tuple[str, str], list[str]], judge: KeywordJudge | None = None
) -> pd.DataFrame:
    """One row per (condition, prompt set): ``refusal_rate`` (keyword judge), ``unchanged``
    (share of completions identical to the ``vanilla`` ones of the same set) and ``n``."""
    judge = judge or KeywordJudge()
    rows = []
    for (cond, name), texts in completions.items():
        base = completions.get(("vanilla", name))
        if base is None or len(base) != len(texts):
            raise ValueError(f"no vanilla completions of the same length for prompt set {name!r}")
        rows.append(
            {
                "condition": cond,
                "prompt_set": name,
                "refusal_rate": sum(judge.judge(texts)) / len(texts),
                "unchanged": sum(a == b for a, b in zip(texts, base, strict=True)) / len(texts),
                "n": len(texts),
            }
        )
    return pd.DataFrame(rows)


def _summary(report: dict[str, Any], table: pd.DataFrame, segments: pd.DataFrame) -> str:
    a, c = report["anchoring"], report["classifier"]
    test = c["harmful_vs_sensitive"]
    rates = table.pivot(index="condition", columns="prompt_set", values="refusal_rate")
    rates = rates.loc[list(CONDITIONS), list(PROMPT_SETS)].reset_index()
    seg = segments.assign(
        layers=segments.layers.map(lambda x: f"{x[0]}–{x[-1]}"),
        top_tokens=segments.top_tokens.map(lambda t: " ".join(repr(x) for x in t[:10])),
    )[["segment", "layers", "hit_rate", "z", "top_tokens"]]
    return "\n".join(
        [
            f"# SCANS on {report['model']}",
            "",
            *[f"- {n}" for n in report["notes"]],
            "",
            f"## Anchoring: {a['segment']} segment, layers {a['layers'][0]}–{a['layers'][-1]}",
            "",
            markdown_table(seg, index=False),
            "",
            "## Transition classifier (harmful vs benign-but-sensitive, held out)",
            "",
            f"τ = {c['tau']:.4f} ({c['criterion']}-optimal on validation), "
            f"precision {test['precision']:.3f}, recall {test['recall']:.3f}, "
            f"F1 {test['f1']:.3f}, AUROC {test['auroc']:.3f}.",
            "",
            "## Refusal rate (keyword judge, greedy)",
            "",
            markdown_table(rates, index=False),
            "",
            "Benign continuations identical to vanilla: "
            + ", ".join(
                f"{r.condition} {r.unchanged:.0%}"
                for r in table[table.prompt_set == "benign"].itertuples()
            )
            + ".",
            "",
        ]
    )


def check_chat(cfg: RunConfig) -> None:
    """SCANS reads the chat template (its transition classifier appends an assistant prefix):
    any other ``--prompt-format`` is a :class:`ConfigError`."""
    if cfg.prompt_format not in (None, "chat"):
        raise ConfigError(
            f"--prompt-format {cfg.prompt_format}: this pipeline supports the chat format only"
        )


def run_scans(
    out: str | Path | None = None,
    cfg: ScansConfig | None = None,
    *,
    data: Data | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Fit SCANS, calibrate τ, evaluate the classifier and the four conditions, and write
    ``report.json``, ``summary.md``, ``completions.csv`` and ``manifest.json`` to ``out``.
    Returns the ``report.json`` content (``refusal`` = the condition × prompt-set table)."""
    cfg = cfg or ScansConfig()
    out = Path(out or cfg.out or "runs/scans")
    out.mkdir(parents=True, exist_ok=True)
    data = data if data is not None else R.preflight(cfg)
    clock = Clock()
    model, _ = R.load(cfg)
    if not getattr(model.tokenizer, "chat_template", None):
        raise ConfigError(f"scans needs a chat model; {cfg.model} has no chat template")
    sets, note = _data(cfg, data)
    write_manifest(
        out, "scans", cfg, model=model, layers=None, data=sets, notes=data.notes,
        threads=R.threads(),
    )  # fmt: skip
    clock.lap("load")
    kw: dict[str, Any] = {"batch_size": cfg.batch_size, "progress": progress}
    scans = Scans.fit(
        model, list(sets["anchors_harmful"]), list(sets["anchors_harmless"]),
        alpha=cfg.steer_alpha, **kw,
    )  # fmt: skip
    clf = scans.classifier
    reference = clf.transitions(model, list(sets["anchors_transition"]), **kw)
    clf = TransitionClassifier.fit(reference, clf.layers, prefix=clf.prefix)
    scans = replace(scans, classifier=clf)
    val_h = scans.classify(model, list(sets["val_harmful"]), **kw)
    val_s = scans.classify(model, list(sets["val_sensitive"]), **kw)
    clf = clf.calibrated(val_h, val_s, criterion=cfg.criterion)
    scans = replace(scans, classifier=clf)
    scores = {name: scans.classify(model, list(sets[name]), **kw) for name in PROMPT_SETS}
    harmful = {name: clf.predict(s).tolist() for name, s in scores.items()}
    clock.lap("fit_and_classify")
    if cfg.layers is not None:
        choice = LayerChoice(tuple(cfg.layers), "given")
    else:
        n_layers = int(model.cfg.n_layers)
        stride = candidate_layers(n_layers, skip_last=cfg.skip_last, stride=cfg.select_stride)
        choice = choose_layers(
            model, {layer: scans.vectors[layer] for layer in stride},
            list(sets["val_harmful"][: cfg.n_select]), list(sets["val_benign"]),
            width=cfg.n_steer_layers, skip_last=cfg.skip_last, strength=cfg.induce_strength,
            batch_size=cfg.batch_size, hook_template=RESID_POST, one_se=cfg.select_one_se,
        )  # fmt: skip
    induce_layers = list(choice.layers)
    induce = ActAdd(tuple(induce_layers), scans.vectors[induce_layers], RESID_POST)
    clock.lap("choose_layers")
    completions = {
        (cond, name): _complete(
            model,
            list(sets[name]),
            cfg,
            scans=scans if cond.endswith("scans") else None,
            harmful=harmful[name],
            induce=induce if cond.startswith("over_refusal") else None,
            progress=progress,
            desc=f"{cond} {name}",
        )  # fmt: skip
        for cond in CONDITIONS
        for name in PROMPT_SETS
    }
    table = refusal_table(completions)
    segments = scans.anchoring.segments
    notes = [
        f"Anchors: {cfg.n_anchors} harmful (half HarmBench, half Do-Not-Answer) + "
        f"{cfg.n_anchors} built-in benign prompts; τ on "
        f"{len(val_h)} harmful + {len(val_s)} sensitive validation prompts; test sets: "
        + ", ".join(f"{n} {len(sets[n])}" for n in PROMPT_SETS)
        + " (MT-Bench is the plain benign set).",
        note,
        f"SCANS: ±α v_l with α = {cfg.steer_alpha:g} (unit v_l) at the anchored layers, from the "
        "instruction end onward, generated tokens included; sign from the classifier.",
        f"Induced over-refusal: +{cfg.induce_strength:g} v_l at layers "
        f"{induce_layers} ({choice.how}; hook_resid_post, prompt positions); the classifier reads "
        "the unsteered model.",
        f"Greedy, {cfg.max_new_tokens} new tokens, KeywordJudge.",
    ]
    report: dict[str, Any] = {
        "model": model_name(model),
        "config": cfg.to_dict(),
        "layer_choice": choice.to_dict(),
        "notes": notes,
        "data": {
            k: {"n": len(v), "source": v.source, "license": v.license} for k, v in sets.items()
        },
        "anchoring": {
            "segment": scans.anchoring.segment,
            "layers": list(scans.layers),
            "segments": segments.to_dict(orient="records"),
        },
        "classifier": {
            "layers": list(clf.layers),
            "prefix": clf.prefix,
            "tau": clf.threshold,
            "criterion": cfg.criterion,
            "validation": classification_metrics(val_h, val_s, clf.threshold),
            **{
                f"harmful_vs_{neg}": classification_metrics(
                    scores["harmful"], scores[neg], clf.threshold
                )
                for neg in ("sensitive", "benign")
            },
            "predicted_harmful": {n: sum(h) / len(h) for n, h in harmful.items()},
        },
        "refusal": table.to_dict(orient="records"),
    }
    frame = pd.DataFrame(
        [
            {"condition": cond, "prompt_set": name, "prompt": p, "score": float(s),
             "predicted_harmful": h, "completion": text, "refused": KeywordJudge()(text)}
            for (cond, name), texts in completions.items()
            for p, s, h, text in zip(sets[name], scores[name], harmful[name], texts, strict=True)
        ]
    )  # fmt: skip
    clock.lap("generate")
    report |= {"timings": clock.steps, "seconds": clock.total(), "peak_rss_mib": peak_rss_mib()}
    atomic_write_bytes(frame.to_csv(index=False).encode(), out / "completions.csv")
    atomic_write_bytes(_summary(report, table, segments).encode(), out / "summary.md")
    atomic_write_json(report, out / "report.json")
    return report
