"""Regenerate every figure in ``figures/`` on the embedded SmolLM2, with its data and settings.

:func:`make_figures` fits AlphaSteer and ActAdd with the demo setting (difference-in-means
direction, layers 14-18, null-space ratio 0.5, α = 10), then draws:

1. ``pca_actadd_vs_alphasteer``: benign/malicious × vanilla/steered in one PCA plane (real
   steered activations), ActAdd beside AlphaSteer;
2. ``pca_strength``: the same plane at several strengths λ;
3. ``pca_on_paper``: the "on paper" view ``h + s(h)`` at the same hook, for comparison;
4. ``layer_sweep``: direction quality, induced refusal and benign KL per layer;
5. ``tradeoff_strength``: harmful refusal vs benign cost over λ, AlphaSteer vs ActAdd;
6. ``tradeoff_ratio``: the same over AlphaSteer's null-space ratio.

Every figure is written as ``.html`` and ``.png``; the DataFrames behind them go to ``data/``
as CSV and the settings, seed, data hashes and headline numbers to ``settings.json``. Nothing
is random beyond the seeded prompt splits, so two runs with the same seed on the same machine
write the same files.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from alphasteer_lens import prompts as P
from alphasteer_lens.activations import cache_activations
from alphasteer_lens.alphasteer import AlphaSteer
from alphasteer_lens.directions import diff_in_means
from alphasteer_lens.logit_lens import vocab_projection
from alphasteer_lens.models import HookedModel, load_model, model_name
from alphasteer_lens.pca import pca_points
from alphasteer_lens.steering import ActAdd, Steering
from alphasteer_lens.storage import atomic_write_bytes, atomic_write_json
from alphasteer_lens.sweeps import (
    Evaluator,
    layer_sweep,
    rank_agreement,
    ratio_sweep,
    strength_sweep,
)
from alphasteer_lens.viz import (
    layer_sweep_figure,
    pca_figure,
    save_figure,
    strength_figure,
    tradeoff_figure,
)

TRADEOFF_XS = ("benign_kl", "benign_refusal", "benign_unchanged")
TRADEOFF_YS = ("harmful_refusal", "harmful_score")


@dataclass(frozen=True)
class FigureSettings:
    """What :func:`make_figures` runs; written to ``settings.json``."""

    seed: int = 0
    layers: tuple[int, ...] = (14, 15, 16, 17, 18)
    ratio: float = 0.5
    alpha: float = 10.0
    view_layer: int = 18
    pca_strength: float = 0.5
    pca_strengths: tuple[float, ...] = (0.0, 0.25, 0.5, 1.0)
    n_benign_fit: int = 640  # AlphaSteer needs more benign rows than d_model (576)
    n_malicious_fit: int = 300
    n_pca: int = 48
    sweep_layers: tuple[int, ...] = tuple(range(30))
    generation_layers: tuple[int, ...] = (6, 10, 14, 18, 22, 26)
    sweep_strength: float = 4.0
    n_sweep_eval: int = 32
    tradeoff_strengths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    ratios: tuple[float, ...] = (0.3, 0.5, 0.7)
    ratio_strength: float = 0.5
    n_tradeoff: int = 24
    max_new_tokens: int = 12
    batch_size: int = 32
    length_matched: bool = True  # direction's harmless side length-matched to the malicious

    @classmethod
    def quick(cls, seed: int = 0) -> FigureSettings:
        """A few-minute run with the same figures on fewer prompts, layers and strengths."""
        return cls(
            seed=seed,
            pca_strengths=(0.0, 0.5, 1.0),
            n_malicious_fit=96,
            n_pca=24,
            sweep_layers=tuple(range(0, 30, 4)),
            generation_layers=(8, 16, 24),
            n_sweep_eval=12,
            tradeoff_strengths=(0.0, 0.4, 0.8),
            ratios=(0.3, 0.5, 0.7),
            n_tradeoff=12,
            max_new_tokens=8,
        )


@dataclass(frozen=True)
class _Data:
    benign_fit: P.PromptSet
    benign_eval: P.PromptSet
    malicious_fit: P.PromptSet
    harmful_eval: P.PromptSet
    utility_eval: P.PromptSet


def _sample(ps: P.PromptSet, n: int, seed: int) -> P.PromptSet:
    return ps.sample(min(n, len(ps)), seed=seed)


def _data(cfg: FigureSettings) -> _Data:
    """Benign: the built-in set (fit/held-out halves) and MT-Bench (utility); malicious fit:
    Do-Not-Answer plus 40% of HarmBench; harmful eval: the other HarmBench prompts."""
    benign_fit, benign_eval = P.benign_instructions().split((0.85, 0.15), seed=cfg.seed)
    hb_fit, hb_eval = P.harmbench().split((0.4, 0.6), seed=cfg.seed)
    dna = P.do_not_answer().deduplicated()
    n_dna = max(cfg.n_malicious_fit - len(hb_fit), 1)
    return _Data(
        benign_fit=_sample(benign_fit, cfg.n_benign_fit, cfg.seed),
        benign_eval=benign_eval,
        malicious_fit=P.PromptSet.concat("malicious_fit", _sample(dna, n_dna, cfg.seed), hb_fit),
        harmful_eval=hb_eval,
        utility_eval=P.mt_bench(),
    )


def _spearman(df: pd.DataFrame, a: str, b: str) -> float | None:
    rho = rank_agreement(df, a, b) if len(df) >= 3 else math.nan
    return None if math.isnan(rho) else round(rho, 4)


def _write_csv(df: pd.DataFrame, path: Path) -> None:
    atomic_write_bytes(df.to_csv(index=False, float_format="%.6g").encode(), path)


def make_figures(
    out_dir: str | Path = "figures",
    seed: int = 0,
    quick: bool = False,
    *,
    model: HookedModel | None = None,
    png: bool | None = None,
) -> dict[str, Any]:
    """Regenerate every figure into ``out_dir`` (see the module docstring) and return what was
    written to ``out_dir/settings.json``: settings, data sizes and hashes, headline numbers and
    the files written. ``png=None`` writes PNGs when a Chromium is installed."""
    cfg = FigureSettings.quick(seed) if quick else FigureSettings(seed=seed)
    out = Path(out_dir)
    (out / "data").mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    model = model if model is not None else load_model()
    data = _data(cfg)
    bs = cfg.batch_size
    files: list[Path] = []
    frames: dict[str, pd.DataFrame] = {}

    # Fit once, at every layer the figures need (one pass per prompt set).
    fit_layers = sorted(set(cfg.layers) | set(cfg.sweep_layers) | set(cfg.generation_layers))
    fit_b = cache_activations(
        model, list(data.benign_fit), layers=fit_layers, batch_size=bs, desc="benign fit"
    )
    fit_m = cache_activations(
        model, list(data.malicious_fit), layers=fit_layers, batch_size=bs, desc="malicious fit"
    )
    # The direction's harmless side is length-matched to the malicious prompts (the built-in
    # benign set has long prompts the harmful sets lack); the null space uses every benign row.
    dir_b = (
        fit_b.select(data.benign_fit.length_matched_indices(data.malicious_fit))
        if cfg.length_matched
        else fit_b
    )
    refusal = {layer: diff_in_means(fit_m[layer], dir_b[layer]) for layer in cfg.layers}
    alphasteer = AlphaSteer.fit(
        fit_b.by_layer(),
        fit_m.by_layer(),
        refusal,
        layers=cfg.layers,
        ratio=cfg.ratio,
        alpha=cfg.alpha,
    )
    actadd = ActAdd(cfg.layers, torch.stack([refusal[layer] for layer in cfg.layers]))
    steerings: dict[str, Steering] = {"actadd": actadd, "alphasteer": alphasteer}

    # 1-3: PCA views on held-out prompts.
    pca_benign = list(_sample(data.benign_eval, cfg.n_pca, cfg.seed))
    pca_harmful = list(_sample(data.harmful_eval, cfg.n_pca, cfg.seed))
    basis, points = pca_points(
        model,
        pca_benign,
        pca_harmful,
        steerings,
        cfg.pca_strengths,
        layer=cfg.view_layer,
        batch_size=bs,
    )
    _, paper = pca_points(
        model,
        pca_benign,
        pca_harmful,
        steerings,
        cfg.pca_strength,
        layer=cfg.view_layer,
        mode="on_paper",
        batch_size=bs,
    )
    frames["pca_points"], frames["pca_on_paper"] = points, paper
    figs = {
        "pca_actadd_vs_alphasteer": pca_figure(
            points, basis=basis, strength=cfg.pca_strength, methods=["actadd", "alphasteer"]
        ),
        "pca_strength": strength_figure(points, basis=basis, methods=["alphasteer", "actadd"]),
        "pca_on_paper": pca_figure(
            paper,
            basis=basis,
            methods=["actadd", "alphasteer"],
            title=f"On paper, h + s(h) at {basis.hook} (only this layer's steering, vanilla h)",
        ),
    }

    # 4: layer sweep (directions from the fit activations), logit mode at every layer,
    # generation mode at a subset for the rank agreement of the two modes.
    sweep_eval_h = list(_sample(data.harmful_eval, cfg.n_sweep_eval, cfg.seed + 1))
    sweep_eval_b = list(_sample(data.benign_eval, cfg.n_sweep_eval, cfg.seed + 1))
    sweeps = {}
    for mode, layers in (("logit", cfg.sweep_layers), ("generation", cfg.generation_layers)):
        sweeps[mode] = layer_sweep(
            model,
            fit_m,
            dir_b,
            sweep_eval_h,
            sweep_eval_b,
            layers=layers,
            strength=cfg.sweep_strength,
            mode=mode,  # type: ignore[arg-type]
            max_new_tokens=cfg.max_new_tokens,
            batch_size=bs,
            progress=False,
        )
    frames["layer_sweep_logit"] = sweeps["logit"]
    frames["layer_sweep_generation"] = sweeps["generation"]
    figs["layer_sweep"] = layer_sweep_figure(sweeps["logit"], generation=sweeps["generation"])

    # 5-6: safety vs utility over λ and over the null-space ratio.
    evaluator = Evaluator.create(
        model,
        list(_sample(data.harmful_eval, cfg.n_tradeoff, cfg.seed + 2)),
        list(_sample(data.utility_eval, cfg.n_tradeoff, cfg.seed + 2)),
        mode="generation",
        max_new_tokens=cfg.max_new_tokens,
        batch_size=bs,
    )
    tradeoff = strength_sweep(
        evaluator, {"alphasteer": alphasteer, "actadd": actadd}, cfg.tradeoff_strengths
    )
    tradeoff.insert(1, "mode", "generation")
    ratios = ratio_sweep(
        evaluator,
        fit_b.by_layer(),
        fit_m.by_layer(),
        refusal,
        cfg.ratios,
        layers=cfg.layers,
        strength=cfg.ratio_strength,
        alpha=cfg.alpha,
    )
    ratios.insert(1, "mode", "generation")
    frames["tradeoff_strength"], frames["tradeoff_ratio"] = tradeoff, ratios
    figs["tradeoff_strength"] = tradeoff_figure(tradeoff, xs=TRADEOFF_XS, ys=TRADEOFF_YS)
    figs["tradeoff_ratio"] = tradeoff_figure(
        ratios,
        xs=TRADEOFF_XS,
        ys=TRADEOFF_YS,
        param="ratio",
        title=f"AlphaSteer over the null-space ratio k/d (λ = {cfg.ratio_strength:g})"
        "<br><sup>generation mode: keyword judge on greedy answers</sup>",
    )
    frames["vocab_projection"] = vocab_projection(
        model, {layer: refusal[layer] for layer in cfg.layers}, k=10
    )

    for name, fig in figs.items():
        files += save_figure(fig, out / name, png=png)
    for name, df in frames.items():
        path = out / "data" / f"{name}.csv"
        _write_csv(df, path)
        files.append(path)

    logit, gen = sweeps["logit"], sweeps["generation"]
    vanilla = {k: round(v, 6) for k, v in evaluator.vanilla.items()}
    summary = {
        "best_auroc_layer": int(logit.loc[logit.auroc.idxmax(), "layer"]),
        "best_auroc": round(float(logit.auroc.max()), 4),
        "most_induced_refusal_layer_logit": int(logit.loc[logit.harmful_score.idxmax(), "layer"]),
        "most_induced_refusal_layer_generation": int(
            gen.loc[gen.harmful_refusal_gen.idxmax(), "layer"]
        ),
        "spearman_logit_score_vs_generation_refusal": _spearman(
            gen, "harmful_score", "harmful_refusal_gen"
        ),
        "spearman_logit_rate_vs_generation_refusal": _spearman(
            gen, "harmful_refusal_logit", "harmful_refusal_gen"
        ),
        "benign_leakage": [round(v, 5) for v in alphasteer.leakage],
        "tradeoff_vanilla": vanilla,
    }
    settings: dict[str, Any] = {
        "settings": asdict(cfg),
        "seed": cfg.seed,
        "quick": quick,
        "model": model_name(model),
        "torch": torch.__version__.split("+")[0],
        "torch_threads": torch.get_num_threads(),
        "data": {
            name: {"size": len(ps), "hash": ps.content_hash(), "source": ps.source}
            for name, ps in _roles(data).items()
        },
        "summary": summary,
        "files": sorted(str(f.relative_to(out)) for f in files),
    }
    atomic_write_json(settings, out / "settings.json")
    return settings | {"frames": frames}


def _roles(data: _Data) -> dict[str, P.PromptSet]:
    """The prompt sets of a run by role (``dataclasses.asdict`` would deep-copy them)."""
    return {name: getattr(data, name) for name in data.__dataclass_fields__}
