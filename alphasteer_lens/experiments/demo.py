"""The demo: AlphaSteer vs ActAdd vs vanilla on any model, measured end to end.

Steps (:mod:`~alphasteer_lens.experiments.recipe`): seeded splits; last-token ``resid_pre``
activations; the refusal direction; the steered layers (given, or chosen on validation data);
AlphaSteer and ActAdd of the same directions; the artifact is saved right away. Then λ is chosen
on the validation sets with the first-token refusal score (AlphaSteer: most harmful refusal with a
bounded benign rise; ActAdd: matching AlphaSteer's harmful refusal), and every method generates
greedily on the held-out test sets, judged by the keyword judge.

Outputs: ``alphasteer.safetensors`` (as soon as the fit finishes; λ added once chosen),
``report.json``, ``summary.md``, ``generations.csv`` (one row per method, set and prompt) and
``manifest.json``. ``resume=True`` reuses a saved artifact (and λ, if chosen) instead of
refitting.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pandas as pd
import torch

from alphasteer_lens.alphasteer import AlphaSteer
from alphasteer_lens.artifacts import load_steering_with_meta, save_steering
from alphasteer_lens.experiments import recipe as R
from alphasteer_lens.experiments.config import RunConfig
from alphasteer_lens.experiments.data import Data
from alphasteer_lens.experiments.docs import demo_table
from alphasteer_lens.experiments.manifest import write_manifest
from alphasteer_lens.experiments.report import Clock, peak_rss_mib
from alphasteer_lens.generation import generate_with_logits
from alphasteer_lens.judges import KeywordJudge, RefusalTokens, refusal_score
from alphasteer_lens.models import model_name
from alphasteer_lens.steering import ActAdd, Steering
from alphasteer_lens.storage import atomic_write_bytes, atomic_write_json

ARTIFACT = "alphasteer.safetensors"


@dataclass(frozen=True)
class DemoConfig(RunConfig):
    """The demo's own settings: how many held-out prompts to generate for (None: all)."""

    n_harmful_test: int | None = None
    n_benign_test: int | None = None

    QUICK: ClassVar[dict[str, Any]] = {
        "strengths": (0.5, 1.0),
        "max_new_tokens": 12,
        "n_harmful_test": 32,
        "n_benign_test": 32,
        "n_harmful_train": 200,
    }

    @classmethod
    def quick_config(cls, seed: int = 0) -> DemoConfig:
        """A few-minute smoke run: fewer prompts, fewer tokens, a shorter λ grid."""
        return cls(seed=seed, quick=True, **cls.QUICK)


def _rate(flags: list[bool]) -> float:
    return float(sum(flags)) / max(len(flags), 1)


def run_demo(
    out: str | Path | None = None,
    cfg: DemoConfig | None = None,
    *,
    data: Data | None = None,
    resume: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the demo and write its files to ``out`` (default ``cfg.out``, else ``runs/demo``)."""
    cfg = cfg or DemoConfig()
    out = Path(out or cfg.out or "runs/demo")
    out.mkdir(parents=True, exist_ok=True)
    data = data if data is not None else R.preflight(cfg)
    torch.manual_seed(cfg.seed)
    clock = Clock()
    model, fmt = R.load(cfg)
    judge = KeywordJudge()
    refusal_ids = RefusalTokens.from_tokenizer(model.tokenizer).ids
    clock.lap("load_model")

    sp = R.splits(data, cfg, n_harmful_test=cfg.n_harmful_test, n_benign_test=cfg.n_benign_test)
    sets = sp.sets()
    hashes = {ps.name: ps.content_hash() for ps in sets.values()}
    clock.lap("load_data")

    def manifest(layers: dict[str, Any] | None) -> None:
        write_manifest(
            out, "demo", cfg, model=model, layers=layers, data=sets, notes=data.notes,
            threads=R.threads(),
        )  # fmt: skip

    manifest(None)
    artifact = out / ARTIFACT
    saved: dict[str, Any] = {}
    if resume and artifact.exists():
        steering, meta = load_steering_with_meta(artifact, model=model)
        assert isinstance(steering, AlphaSteer)
        steer_a, saved = steering, dict(meta["extra"])
        actadd = ActAdd(steer_a.layers, steer_a.r)
        layers, choice = list(steer_a.layers), saved["layer_choice"]
        refused_fraction = saved.get("harmful_train_refused_fraction")
        clock.lap("fit (resumed)")
    else:
        fitted = R.fit(model, sp, cfg, fmt, progress=progress)
        steer_a, actadd, layers = fitted.alphasteer, fitted.actadd, fitted.layers
        choice, refused_fraction = fitted.choice.to_dict(), fitted.refused_fraction
        saved = {
            "direction": cfg.direction,
            "layer_choice": choice,
            "prompt_format": fmt.to_json(),
            "harmful_train_refused_fraction": refused_fraction,
        }
        save_steering(steer_a, artifact, model=model, data_hashes=hashes, extra=saved)
        clock.lap("fit")
    manifest(choice)

    if "strength" in saved:
        lam_a, lam_act = float(saved["strength"]), float(saved["actadd_strength"])
        sweep = pd.DataFrame(saved["validation_sweep"])
        clock.lap("validation_sweep (resumed)")
    else:
        sweep = R.validation_sweep(
            model, list(sp.harmful_val), list(sp.benign_val),
            {"alphasteer": steer_a, "actadd": actadd}, cfg.strengths, fmt=fmt,
            batch_size=cfg.batch_size, harmful_only=("actadd",), progress=progress,
        )  # fmt: skip
        lam_a, lam_act = R.choose_strengths(sweep, cfg.max_benign_rise)
        saved |= {
            "strength": lam_a,
            "actadd_strength": lam_act,
            "validation_sweep": sweep.to_dict(orient="records"),
        }
        save_steering(steer_a, artifact, model=model, data_hashes=hashes, extra=saved)
        clock.lap("validation_sweep")

    methods: dict[str, tuple[Steering | None, float]] = {
        "vanilla": (None, 0.0),
        "actadd": (actadd, lam_act),
        "alphasteer": (steer_a, lam_a),
    }
    results: dict[str, dict[str, float]] = {}
    rows: list[dict[str, Any]] = []
    vanilla_benign: list[str] = []
    for name, (st, lam) in methods.items():
        gen: dict[str, list[str]] = {}
        score: dict[str, torch.Tensor] = {}
        for s, ps in (("harmful", sp.harmful_test), ("benign", sp.benign_test)):
            gen[s], first = generate_with_logits(
                model, list(ps), steering=st, strength=lam, max_new_tokens=cfg.max_new_tokens,
                batch_size=cfg.batch_size, prompt_format=fmt, progress=progress,
                desc=f"{name} {s}",
            )  # fmt: skip
            assert first is not None
            score[s] = refusal_score(first, refusal_ids)
            refused = judge.judge(gen[s])
            rows += [
                {"method": name, "strength": lam, "set": s, "prompt": p, "completion": c,
                 "refused": r}
                for p, c, r in zip(ps, gen[s], refused, strict=True)
            ]  # fmt: skip
        if name == "vanilla":
            vanilla_benign = gen["benign"]
        results[name] = {
            "strength": lam,
            "harmful_refusal_rate": _rate(judge.judge(gen["harmful"])),
            "benign_refusal_rate": _rate(judge.judge(gen["benign"])),
            "benign_unchanged_fraction": _rate(
                [a == b for a, b in zip(gen["benign"], vanilla_benign, strict=True)]
            ),
            "harmful_refusal_score": score["harmful"].mean().item(),
            "benign_refusal_score": score["benign"].mean().item(),
        }
    clock.lap("evaluate")

    report: dict[str, Any] = {
        "model": model_name(model),
        "layers": layers,
        "layer_choice": choice,
        "prompt_format": fmt.to_json(),
        "strength": lam_a,
        "actadd_strength": lam_act,
        "methods": results,
        "benign_leakage": {str(k): v for k, v in zip(layers, steer_a.leakage, strict=True)},
        "direction": cfg.direction,
        "harmful_train_refused_fraction": refused_fraction,
        "data": {ps.name: len(ps) for ps in sets.values()},
        "data_hashes": hashes,
        "notes": list(data.notes),
        "config": cfg.to_dict(),
        "validation_sweep": sweep.to_dict(orient="records"),
        "timings": clock.steps,
    }
    report["seconds"] = clock.total()
    report["peak_rss_mib"] = peak_rss_mib()
    atomic_write_json(report, out / "report.json")
    atomic_write_bytes(pd.DataFrame(rows).to_csv(index=False).encode(), out / "generations.csv")
    atomic_write_bytes(summary_markdown(report).encode(), out / "summary.md")
    return report


def summary_markdown(report: dict[str, Any]) -> str:
    """A short human-readable summary of a demo report."""
    leak = ", ".join(f"L{k}: {v:.3f}" for k, v in report["benign_leakage"].items())
    choice = report.get("layer_choice") or {}
    return "\n".join(
        [
            f"# alphasteer_lens demo: {report['model']}",
            "",
            f"Steered layers {report['layers']} (`resid_pre`, prompt positions; "
            f"{choice.get('how', 'given')}); "
            f"AlphaSteer λ = {report['strength']}, ActAdd λ = {report['actadd_strength']} "
            "(chosen on validation data).",
            "Data (name: prompts): "
            + ", ".join(f"{k}: {v}" for k, v in report["data"].items())
            + ".",
            *[f"Note: {n}" for n in report.get("notes", [])],
            "Refusal = keyword judge on greedy answers; score = mean log-odds of a refusal "
            "opening at the first generated token.",
            "",
            demo_table(report),
            "",
            f"Benign leakage ‖Hb P‖/‖Hb‖: {leak}.",
            f"Total time: {report['seconds']:.0f} s; peak memory {report.get('peak_rss_mib')} MiB.",
            "",
        ]
    )
