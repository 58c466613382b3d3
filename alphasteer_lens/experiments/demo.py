"""The demo: AlphaSteer vs ActAdd vs vanilla on the embedded SmolLM2, measured end to end.

Data (all from pinned PyPI wheels or the package, so it runs on a fresh machine):
- benign train/val: the built-in benign instruction set; benign test: MT-Bench turn 1 (80);
- harmful train/val: Do-Not-Answer (938 unique) plus a seeded 100-prompt share of HarmBench;
  harmful test: the other 100 HarmBench prompts (held out). Do-Not-Answer's short questions
  alone do not transfer to HarmBench's imperative requests on this model, hence the share.

Steps: cache last-token ``resid_pre`` activations; build the refusal direction (difference in
means by default, against a length-matched subset of the benign train prompts; refused −
complied labels the harmful prompts by the model's own greedy answers); fit AlphaSteer; choose
λ on the validation sets with the cheap logit-level refusal score; pick ActAdd's λ to match
AlphaSteer's harmful validation score; then generate greedily on the held-out test sets.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from alphasteer_lens import prompts as P
from alphasteer_lens.activations import Activations, cache_activations
from alphasteer_lens.alphasteer import AlphaSteer
from alphasteer_lens.artifacts import save_steering
from alphasteer_lens.directions import diff_in_means, refused_minus_complied
from alphasteer_lens.generation import generate, generate_with_logits, next_token_logits
from alphasteer_lens.judges import KeywordJudge, RefusalTokens, refusal_score
from alphasteer_lens.models import HookedModel, load_model, model_name
from alphasteer_lens.steering import ActAdd, Steering
from alphasteer_lens.storage import atomic_write_bytes, atomic_write_json


@dataclass(frozen=True)
class DemoConfig:
    """Settings of the demo; the defaults are the ones reported in the README."""

    seed: int = 0
    layers: tuple[int, ...] = (14, 15, 16, 17, 18)
    direction: str = "diff_in_means"  # or "refused_minus_complied"
    length_matched: bool = True  # diff_in_means: harmless side length-matched to the harmful
    ratio: float = 0.5
    alpha: float = 10.0
    strengths: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0, 1.5)
    max_benign_rise: float = 0.03  # allowed rise of benign first-token refusal (validation)
    val_fraction: float = 0.15
    label_tokens: int = 16
    max_new_tokens: int = 24
    batch_size: int = 32
    n_val: int = 80  # cap on each validation set
    n_harmful_test: int | None = None
    n_benign_test: int | None = None
    n_harmful_train: int | None = None

    @classmethod
    def quick(cls, seed: int = 0) -> DemoConfig:
        """A few-minute smoke run: fewer prompts, fewer tokens, a shorter λ grid."""
        return cls(
            seed=seed,
            strengths=(0.5, 1.0),
            max_new_tokens=12,
            n_harmful_test=32,
            n_benign_test=32,
            n_harmful_train=200,
        )


@dataclass
class _Clock:
    start: float = field(default_factory=time.perf_counter)
    steps: dict[str, float] = field(default_factory=dict)

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.steps[name] = round(now - self.start - sum(self.steps.values()), 2)


def _rate(flags: list[bool]) -> float:
    return float(sum(flags)) / max(len(flags), 1)


def _validation_sweep(
    model: HookedModel,
    harmful: list[str],
    benign: list[str],
    steerings: dict[str, Steering],
    strengths: tuple[float, ...],
    refusal_ids: tuple[int, ...],
    batch_size: int,
) -> pd.DataFrame:
    rows = []
    base_h = refusal_score(
        next_token_logits(model, harmful, batch_size=batch_size, desc="val harmful"), refusal_ids
    )
    base_b = refusal_score(
        next_token_logits(model, benign, batch_size=batch_size, desc="val benign"), refusal_ids
    )
    rows.append(
        {
            "method": "vanilla",
            "strength": 0.0,
            "harmful_score": base_h.mean().item(),
            "harmful_refusal": (base_h > 0).float().mean().item(),
            "benign_score": base_b.mean().item(),
            "benign_refusal": (base_b > 0).float().mean().item(),
        }
    )
    for name, st in steerings.items():
        for lam in strengths:
            h = refusal_score(
                next_token_logits(
                    model,
                    harmful,
                    steering=st,
                    strength=lam,
                    batch_size=batch_size,
                    desc=f"val {name} {lam}",
                ),
                refusal_ids,
            )
            b = refusal_score(
                next_token_logits(
                    model,
                    benign,
                    steering=st,
                    strength=lam,
                    batch_size=batch_size,
                    desc=f"val {name} {lam}",
                ),
                refusal_ids,
            )
            rows.append(
                {
                    "method": name,
                    "strength": lam,
                    "harmful_score": h.mean().item(),
                    "harmful_refusal": (h > 0).float().mean().item(),
                    "benign_score": b.mean().item(),
                    "benign_refusal": (b > 0).float().mean().item(),
                }
            )
    return pd.DataFrame(rows)


def _choose(sweep: pd.DataFrame, cfg: DemoConfig) -> tuple[float, float]:
    """AlphaSteer's λ: the highest harmful first-token refusal on validation data among the
    strengths whose benign first-token refusal rises by at most ``max_benign_rise`` (ties go to
    the smaller λ). ActAdd's λ: the one whose harmful refusal comes closest to that."""
    base = sweep[sweep.method == "vanilla"].iloc[0]
    a = sweep[sweep.method == "alphasteer"].sort_values("strength")
    ok = a[a.benign_refusal <= base.benign_refusal + cfg.max_benign_rise + 1e-9]
    pool = ok if len(ok) else a.head(1)
    best = pool.loc[pool.harmful_refusal.idxmax()]
    b = sweep[sweep.method == "actadd"].sort_values("strength")
    act = b.iloc[int((b.harmful_refusal - best.harmful_refusal).abs().to_numpy().argmin())]
    return float(best.strength), float(act.strength)


def _refusal_direction(
    model: HookedModel,
    cfg: DemoConfig,
    benign: Activations,
    harmful: Activations,
    benign_prompts: P.PromptSet,
    harmful_prompts: P.PromptSet,
    judge: KeywordJudge,
) -> tuple[dict[int, torch.Tensor], float | None]:
    """Per layer, toward refusal: harmful − benign means (the benign side length-matched to the
    harmful prompts unless ``cfg.length_matched`` is off), or refused − complied among the
    harmful prompts as labelled by the model's own greedy answers."""
    if cfg.direction == "diff_in_means":
        if cfg.length_matched:
            benign = benign.select(benign_prompts.length_matched_indices(harmful_prompts))
        return {layer: diff_in_means(harmful[layer], benign[layer]) for layer in cfg.layers}, None
    if cfg.direction != "refused_minus_complied":
        raise ValueError(
            f"direction must be 'diff_in_means' or 'refused_minus_complied', not {cfg.direction!r}"
        )
    answers = generate(
        model,
        list(harmful_prompts),
        max_new_tokens=cfg.label_tokens,
        batch_size=cfg.batch_size,
        desc="labelling harmful answers",
    )
    refused = judge.judge(answers)
    return {layer: refused_minus_complied(harmful[layer], refused) for layer in cfg.layers}, _rate(
        refused
    )


def run_demo(out: str | Path = "runs/demo", cfg: DemoConfig | None = None) -> dict[str, Any]:
    """Run the whole demo and write ``report.json``, ``summary.md`` and the artifact to ``out``."""
    cfg = cfg or DemoConfig()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    clock = _Clock()
    model = load_model()
    judge = KeywordJudge()
    refusal_ids = RefusalTokens.from_tokenizer(model.tokenizer).ids
    clock.lap("load_model")

    benign_train, benign_val = P.benign_instructions().split(
        (1 - cfg.val_fraction, cfg.val_fraction), seed=cfg.seed
    )
    dna = P.do_not_answer().deduplicated()
    if cfg.n_harmful_train is not None:
        dna = dna.sample(cfg.n_harmful_train, seed=cfg.seed)
    dna_train, dna_val = dna.split((1 - cfg.val_fraction, cfg.val_fraction), seed=cfg.seed)
    hb_train, hb_val, harmful_test = P.harmbench().split((0.4, 0.1, 0.5), seed=cfg.seed)
    harmful_train = P.PromptSet.concat("harmful_train", dna_train, hb_train)
    harmful_val = P.PromptSet.concat("harmful_val", dna_val, hb_val)
    benign_val = benign_val.sample(min(cfg.n_val, len(benign_val)), seed=cfg.seed)
    harmful_val = harmful_val.sample(min(cfg.n_val, len(harmful_val)), seed=cfg.seed)
    benign_test = P.mt_bench()
    if cfg.n_harmful_test is not None:
        harmful_test = harmful_test.sample(cfg.n_harmful_test, seed=cfg.seed)
    if cfg.n_benign_test is not None:
        benign_test = benign_test.sample(cfg.n_benign_test, seed=cfg.seed)
    clock.lap("load_data")

    layers = list(cfg.layers)
    acts_b = cache_activations(
        model,
        list(benign_train),
        layers=layers,
        batch_size=cfg.batch_size,
        desc="benign activations",
    )
    acts_h = cache_activations(
        model,
        list(harmful_train),
        layers=layers,
        batch_size=cfg.batch_size,
        desc="harmful activations",
    )
    clock.lap("cache_activations")

    refusal, refused_fraction = _refusal_direction(
        model, cfg, acts_b, acts_h, benign_train, harmful_train, judge
    )
    steer_a = AlphaSteer.fit(
        acts_b.by_layer(),
        acts_h.by_layer(),
        refusal,
        layers=layers,
        ratio=cfg.ratio,
        alpha=cfg.alpha,
    )
    actadd = ActAdd(tuple(layers), torch.stack([refusal[layer] for layer in layers]))
    clock.lap("fit")

    sweep = _validation_sweep(
        model,
        list(harmful_val),
        list(benign_val),
        {"alphasteer": steer_a, "actadd": actadd},
        cfg.strengths,
        refusal_ids,
        cfg.batch_size,
    )
    lam_a, lam_act = _choose(sweep, cfg)
    clock.lap("validation_sweep")

    methods: dict[str, tuple[Steering | None, float]] = {
        "vanilla": (None, 0.0),
        "actadd": (actadd, lam_act),
        "alphasteer": (steer_a, lam_a),
    }
    results: dict[str, dict[str, float]] = {}
    texts: dict[str, dict[str, list[str]]] = {}
    for name, (st, lam) in methods.items():
        gen: dict[str, list[str]] = {}
        score: dict[str, torch.Tensor] = {}
        for s, ps in (("harmful", harmful_test), ("benign", benign_test)):
            gen[s], first = generate_with_logits(
                model, list(ps), steering=st, strength=lam, max_new_tokens=cfg.max_new_tokens,
                batch_size=cfg.batch_size, desc=f"{name} {s}",
            )  # fmt: skip
            assert first is not None
            score[s] = refusal_score(first, refusal_ids)
        texts[name] = gen
        results[name] = {
            "strength": lam,
            "harmful_refusal_rate": _rate(judge.judge(gen["harmful"])),
            "benign_refusal_rate": _rate(judge.judge(gen["benign"])),
            "benign_unchanged_fraction": _rate(
                [a == b for a, b in zip(gen["benign"], texts["vanilla"]["benign"], strict=True)]
            ),
            "harmful_refusal_score": score["harmful"].mean().item(),
            "benign_refusal_score": score["benign"].mean().item(),
        }
    clock.lap("evaluate")

    hashes = {
        ps.name: ps.content_hash()
        for ps in (benign_train, benign_val, harmful_train, harmful_val, harmful_test, benign_test)
    }
    save_steering(
        steer_a,
        out / "alphasteer.safetensors",
        model=model,
        data_hashes=hashes,
        extra={"strength": lam_a, "direction": cfg.direction},
    )
    report: dict[str, Any] = {
        "model": model_name(model),
        "layers": layers,
        "strength": lam_a,
        "actadd_strength": lam_act,
        "methods": results,
        "benign_leakage": {str(k): v for k, v in zip(layers, steer_a.leakage, strict=True)},
        "direction": cfg.direction,
        "harmful_train_refused_fraction": refused_fraction,
        "data": {
            ps.name: len(ps)
            for ps in (
                benign_train,
                benign_val,
                harmful_train,
                harmful_val,
                harmful_test,
                benign_test,
            )
        },
        "data_hashes": hashes,
        "config": asdict(cfg),
        "validation_sweep": sweep.to_dict(orient="records"),
        "timings": clock.steps,
    }
    report["seconds"] = round(time.perf_counter() - clock.start, 1)
    report["peak_rss_mib"] = peak_rss_mib()
    atomic_write_json(report, out / "report.json")
    atomic_write_json(texts, out / "generations.json")
    atomic_write_bytes(summary_markdown(report).encode(), out / "summary.md")
    return report


def peak_rss_mib() -> float | None:
    """Peak resident memory of this process so far (MiB), or None where the OS does not say."""
    try:
        import resource
    except ImportError:  # not on Windows
        return None
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return round(kib / 1024, 1)


def markdown_table(df: pd.DataFrame) -> str:
    """A GitHub markdown table of ``df`` (index first), floats to three decimals."""

    def cell(v: Any) -> str:
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    head = ["", *map(str, df.columns)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for idx, row in df.iterrows():
        lines.append("| " + " | ".join([str(idx), *(cell(v) for v in row)]) + " |")
    return "\n".join(lines)


def summary_markdown(report: dict[str, Any]) -> str:
    """A short human-readable summary of a demo report."""
    df = pd.DataFrame(report["methods"]).T
    cols = [
        "strength",
        "harmful_refusal_rate",
        "benign_refusal_rate",
        "benign_unchanged_fraction",
        "harmful_refusal_score",
        "benign_refusal_score",
    ]
    leak = ", ".join(f"L{k}: {v:.3f}" for k, v in report["benign_leakage"].items())
    return "\n".join(
        [
            f"# alphasteer_lens demo: {report['model']}",
            "",
            f"Steered layers {report['layers']} (`resid_pre`, last prompt token); "
            f"AlphaSteer λ = {report['strength']}, ActAdd λ = {report['actadd_strength']} "
            "(chosen on validation data).",
            "Data (name: prompts): "
            + ", ".join(f"{k}: {v}" for k, v in report["data"].items())
            + ".",
            "Refusal = keyword judge on greedy answers; score = mean log-odds of a refusal "
            "opening at the first generated token.",
            "",
            markdown_table(df[cols]),
            "",
            f"Benign leakage ‖Hb P‖/‖Hb‖: {leak}.",
            f"Total time: {report['seconds']:.0f} s; peak memory {report.get('peak_rss_mib')} MiB.",
            "",
        ]
    )
