"""Regenerate every figure in ``figures/`` on any model, with its data and settings.

:func:`make_figures` fits AlphaSteer and ActAdd with the shared recipe (difference-in-means
direction, length-matched; layers given or chosen on validation data; null-space ratio 0.5,
α = 10), then draws:

1. ``pca_actadd_vs_alphasteer``: benign/malicious × vanilla/steered in one PCA plane (real
   steered activations), ActAdd beside AlphaSteer;
2. ``pca_strength``: the same plane at several strengths λ;
3. ``pca_on_paper``: the "on paper" view ``h + s(h)`` at the same hook, for comparison;
4. ``layer_sweep``: direction quality, induced refusal and benign KL per layer;
5. ``tradeoff_strength``: harmful refusal vs benign cost over λ, AlphaSteer vs ActAdd;
6. ``tradeoff_ratio``: the same over AlphaSteer's null-space ratio.

Every figure is written as ``.html`` and ``.png``; the DataFrames behind them go to ``data/``
as CSV and the settings, seed, data hashes and headline numbers to ``settings.json`` (plus
``manifest.json``). Nothing is random beyond the seeded prompt splits, so two runs with the same
seed on the same machine write the same files.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pandas as pd
import torch

from alphasteer_lens.experiments import recipe as R
from alphasteer_lens.experiments.config import RunConfig
from alphasteer_lens.experiments.data import Data
from alphasteer_lens.experiments.manifest import write_manifest
from alphasteer_lens.logit_lens import vocab_projection
from alphasteer_lens.models import HookedModel, model_name
from alphasteer_lens.pca import pca_points
from alphasteer_lens.prompts import PromptSet
from alphasteer_lens.steering import Steering
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
class FigureSettings(RunConfig):
    """The figures' own settings; written to ``settings.json``. ``view_layer`` None: the last
    steered layer; ``sweep_layers`` None: ``n_sweep_layers`` evenly spread layers (None: all);
    ``n_generation_layers`` evenly spaced layers for the generation-mode sweep."""

    view_layer: int | None = None
    pca_strength: float = 0.5
    pca_strengths: tuple[float, ...] = (0.0, 0.25, 0.5, 1.0)
    n_benign_fit: int = 640  # AlphaSteer wants more benign rows than d_model (576 on SmolLM2)
    n_pca: int = 48
    sweep_layers: tuple[int, ...] | None = None
    n_sweep_layers: int | None = None
    n_generation_layers: int = 6
    sweep_strength: float = 4.0
    n_sweep_eval: int = 32
    tradeoff_strengths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    ratios: tuple[float, ...] = (0.3, 0.5, 0.7)
    ratio_strength: float = 0.5
    n_tradeoff: int = 24
    png: bool | None = None  # None: PNGs when a Chromium is installed

    QUICK: ClassVar[dict[str, Any]] = {
        "pca_strengths": (0.0, 0.5, 1.0),
        "n_harmful_train": 16,
        "n_pca": 24,
        "n_sweep_layers": 8,
        "n_generation_layers": 3,
        "n_sweep_eval": 12,
        "tradeoff_strengths": (0.0, 0.4, 0.8),
        "n_tradeoff": 12,
        "max_new_tokens": 8,
        "n_select": 16,
    }


def _sample(ps: PromptSet, n: int, seed: int) -> PromptSet:
    return ps.sample(min(n, len(ps)), seed=seed)


def _spearman(df: pd.DataFrame, a: str, b: str) -> float | None:
    rho = rank_agreement(df, a, b) if len(df) >= 3 else math.nan
    return None if math.isnan(rho) else round(rho, 4)


def _write_csv(df: pd.DataFrame, path: Path) -> None:
    atomic_write_bytes(df.to_csv(index=False, float_format="%.6g").encode(), path)


def _spread(n_layers: int, k: int) -> tuple[int, ...]:
    """``k`` layers evenly spread over the model (6 of 30: 2, 7, 12, 17, 22, 27)."""
    k = max(1, min(k, n_layers))
    return tuple(sorted({int((i + 0.5) * n_layers / k) for i in range(k)}))


def _best_layer(df: pd.DataFrame, col: str) -> int | None:
    """The layer with the highest ``col`` (None where every value is NaN)."""
    values = df[col].astype(float)
    return None if values.isna().all() else int(df.loc[values.idxmax(), "layer"])


def make_figures(
    out: str | Path | None = None,
    cfg: FigureSettings | None = None,
    *,
    data: Data | None = None,
    model: HookedModel | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Regenerate every figure into ``out`` (see the module docstring) and return what was
    written to ``out/settings.json``: settings, layers, data sizes and hashes, headline numbers
    and the files written."""
    cfg = cfg or FigureSettings()
    out = Path(out or cfg.out or "figures")
    (out / "data").mkdir(parents=True, exist_ok=True)
    data = data if data is not None else R.preflight(cfg)
    torch.manual_seed(cfg.seed)
    if model is None:
        model, fmt = R.load(cfg)
    else:
        from alphasteer_lens.formats import default_format

        fmt = default_format(model.tokenizer)
    R.library_format(fmt, model)  # the sweeps and PCA read the model's default format
    n_layers = int(model.cfg.n_layers)
    sp = R.splits(data, cfg, model=model, fmt=fmt)
    sp = dataclasses.replace(sp, benign_train=_sample(sp.benign_train, cfg.n_benign_fit, cfg.seed))
    bs = cfg.batch_size
    files: list[Path] = []
    frames: dict[str, pd.DataFrame] = {}
    sweep_layers = cfg.sweep_layers or _spread(n_layers, cfg.n_sweep_layers or n_layers)
    generation_layers = _spread(n_layers, cfg.n_generation_layers)

    # Fit once, at every layer the figures need (one pass per prompt set).
    fitted = R.fit(
        model, sp, cfg, fmt, extra_layers=(*sweep_layers, *generation_layers), progress=progress
    )
    layers = tuple(fitted.layers)
    view_layer = cfg.view_layer if cfg.view_layer is not None else layers[-1]
    fit_b, fit_m, dir_b = fitted.benign, fitted.harmful, fitted.direction_benign
    refusal, alphasteer, actadd = fitted.refusal, fitted.alphasteer, fitted.actadd
    steerings: dict[str, Steering] = {"actadd": actadd, "alphasteer": alphasteer}
    write_manifest(
        out, "figures", cfg, model=model, layers=fitted.choice.to_dict(), data=sp.sets(),
        notes=data.notes, threads=R.threads(),
    )  # fmt: skip

    # 1-3: PCA views on held-out prompts.
    pca_benign = list(_sample(sp.benign_val, cfg.n_pca, cfg.seed))
    pca_harmful = list(_sample(sp.harmful_test, cfg.n_pca, cfg.seed))
    basis, points = pca_points(
        model,
        pca_benign,
        pca_harmful,
        steerings,
        cfg.pca_strengths,
        layer=view_layer,
        batch_size=bs,
    )
    _, paper = pca_points(
        model,
        pca_benign,
        pca_harmful,
        steerings,
        cfg.pca_strength,
        layer=view_layer,
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
    sweep_eval_h = list(_sample(sp.harmful_test, cfg.n_sweep_eval, cfg.seed + 1))
    sweep_eval_b = list(_sample(sp.benign_val, cfg.n_sweep_eval, cfg.seed + 1))
    sweeps = {}
    for mode, swept in (("logit", sweep_layers), ("generation", generation_layers)):
        sweeps[mode] = layer_sweep(
            model,
            fit_m,
            dir_b,
            sweep_eval_h,
            sweep_eval_b,
            layers=swept,
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
        list(_sample(sp.harmful_test, cfg.n_tradeoff, cfg.seed + 2)),
        list(_sample(sp.benign_test, cfg.n_tradeoff, cfg.seed + 2)),
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
        layers=layers,
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
        model, {layer: refusal[layer] for layer in layers}, k=10
    )

    for name, fig in figs.items():
        files += save_figure(fig, out / name, png=cfg.png)
    for name, df in frames.items():
        path = out / "data" / f"{name}.csv"
        _write_csv(df, path)
        files.append(path)

    logit, gen = sweeps["logit"], sweeps["generation"]
    vanilla = {k: round(v, 6) for k, v in evaluator.vanilla.items()}
    summary = {
        "best_auroc_layer": _best_layer(logit, "auroc"),
        "best_auroc": None if logit.auroc.isna().all() else round(float(logit.auroc.max()), 4),
        "most_induced_refusal_layer_logit": _best_layer(logit, "harmful_score"),
        "most_induced_refusal_layer_generation": _best_layer(gen, "harmful_refusal_gen"),
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
        "settings": cfg.to_dict(),
        "seed": cfg.seed,
        "quick": cfg.quick,
        "layers": list(layers),
        "layer_choice": fitted.choice.to_dict(),
        "view_layer": view_layer,
        "notes": list(data.notes),
        "model": model_name(model),
        "torch": torch.__version__.split("+")[0],
        "torch_threads": torch.get_num_threads(),
        "data": {
            name: {"size": len(ps), "hash": ps.content_hash(), "source": ps.source}
            for name, ps in sp.sets().items()
        },
        "summary": summary,
        "files": sorted(str(f.relative_to(out)) for f in files),
    }
    atomic_write_json(settings, out / "settings.json")
    return settings | {"frames": frames}
