"""Multi-objective search over AlphaSteer's settings with Optuna (NSGA-II), cheap enough to run
hundreds of trials: everything a trial needs is cached once.

Search space (:class:`SearchSpace`): the layer window (``start``, ``width``), the strength λ, the
null-space ratio, the ridge α, the gate (``none``: AlphaSteer as fitted; ``calibrated``:
:class:`~alphasteer_lens.gates.CalibratedAlphaSteer` on AlphaSteer's own score with its
false-steer rate ε; ``probe``: the same gate on a :class:`~alphasteer_lens.gates.GateProbe`
logit, with the probe's inverse regularisation ``C`` searched too).

Objectives, all from first-token logits on validation prompts (:data:`OBJECTIVES`):

1. ``harmful_refusal`` — mean refusal log-odds of the first token on harmful prompts (maximise);
2. ``benign_kl`` — mean first-token KL(vanilla ‖ steered) on benign prompts (minimise);
3. ``benign_refusal`` — mean refusal log-odds on benign prompts (minimise).

What is cached (:func:`prepare_search_data`, one pass per prompt set over every layer in the
range): last-token activations of the fit sets (benign, malicious), the benign calibration set
and the validation sets; the benign Gram eigendecomposition per layer (so a trial's null space is
a column slice); the vanilla first-token logits of the validation sets. A trial then fits ``w``
(a k×k solve per layer), calibrates τ, and runs one steered prefill — only for the validation
prompts the steering touches: a prompt whose gate stays shut at every layer (predicted exactly
from the cached activations, see :mod:`alphasteer_lens.gates`) has the vanilla logits.

Studies persist in SQLite (``storage="sqlite:///study.db"``) and resume: running again with the
same file and name adds trials to the ones already there. The sampler is seeded, so the same seed
on a fresh file gives the same trials.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from alphasteer_lens.activations import cache_activations
from alphasteer_lens.alphasteer import AlphaSteer, fit_steering_weights
from alphasteer_lens.directions import diff_in_means
from alphasteer_lens.formats import PromptFormat
from alphasteer_lens.gates import CalibratedAlphaSteer, GateProbe
from alphasteer_lens.generation import next_token_logits
from alphasteer_lens.hookpoints import RESID_PRE
from alphasteer_lens.judges import RefusalTokens, refusal_score
from alphasteer_lens.metrics import first_token_kl
from alphasteer_lens.models import HookedModel
from alphasteer_lens.nullspace import NullSpace, check_activations, gram_lower

if TYPE_CHECKING:
    import optuna
    import pandas as pd
    import plotly.graph_objects as go

OBJECTIVES: tuple[tuple[str, str], ...] = (
    ("harmful_refusal", "maximize"),
    ("benign_kl", "minimize"),
    ("benign_refusal", "minimize"),
)
GATES = ("none", "calibrated", "probe")

__all__ = [
    "OBJECTIVES",
    "SearchData",
    "SearchSpace",
    "TrialParams",
    "build_steering",
    "evaluate",
    "pareto_figure",
    "pareto_frame",
    "prepare_search_data",
    "run_study",
    "trials_frame",
]


@dataclass(frozen=True)
class SearchSpace:
    """Ranges of the search. Layers are absolute indices, ``layer_max`` inclusive; a window that
    would run past ``layer_max`` is cut there. ``strength``, ``alpha`` and ``eps`` are sampled on
    a log scale, and so is the probe's ``probe_c``."""

    layer_min: int
    layer_max: int
    width: tuple[int, int] = (1, 6)
    strength: tuple[float, float] = (0.1, 4.0)
    ratio: tuple[float, float] = (0.2, 0.8)
    alpha: tuple[float, float] = (0.1, 100.0)
    eps: tuple[float, float] = (0.01, 0.2)
    gates: tuple[str, ...] = GATES
    margin: float = 0.25
    probe_c: tuple[float, float] = (0.01, 10.0)

    def __post_init__(self) -> None:
        if not 0 <= self.layer_min <= self.layer_max:
            raise ValueError(
                f"need 0 <= layer_min <= layer_max, got {self.layer_min}, {self.layer_max}"
            )
        for name in ("width", "strength", "ratio", "alpha", "eps", "probe_c"):
            lo, hi = getattr(self, name)
            if not lo <= hi or lo <= 0:
                raise ValueError(f"{name} range must be 0 < low <= high, got {(lo, hi)}")
        if not 0 < self.ratio[1] < 1 or not 0 < self.eps[1] < 1:
            raise ValueError("ratio and eps must lie in (0, 1)")
        bad = [g for g in self.gates if g not in GATES]
        if bad or not self.gates:
            raise ValueError(f"gates must be a non-empty subset of {GATES}, got {self.gates}")

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(range(self.layer_min, self.layer_max + 1))


@dataclass(frozen=True)
class TrialParams:
    """One point of the search space (a trial's parameters, or settings given by hand)."""

    start: int
    width: int
    strength: float
    ratio: float
    alpha: float
    gate: str = "none"
    eps: float | None = None
    margin: float = 0.25
    probe_c: float | None = None

    def layers(self, layer_max: int | None = None) -> tuple[int, ...]:
        end = self.start + self.width - 1
        if layer_max is not None:
            end = min(end, layer_max)
        return tuple(range(self.start, end + 1))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], margin: float = 0.25) -> TrialParams:
        return cls(
            start=int(d["start"]),
            width=int(d["width"]),
            strength=float(d["strength"]),
            ratio=float(d["ratio"]),
            alpha=float(d["alpha"]),
            gate=str(d.get("gate", "none")),
            eps=None if d.get("eps") is None or _isnan(d.get("eps")) else float(d["eps"]),
            margin=float(d.get("margin", margin)),
            probe_c=None if _missing(d.get("probe_c")) else float(d["probe_c"]),
        )


def _isnan(x: Any) -> bool:
    return isinstance(x, float) and math.isnan(x)


def _missing(x: Any) -> bool:
    return x is None or _isnan(x)


@dataclass
class SearchData:
    """Everything a trial reads, computed once by :func:`prepare_search_data`. Activations are
    last-token ``[n, d]`` tensors per layer; ``eigen`` holds the benign Gram eigendecomposition
    per layer (ascending eigenvalues, eigenvectors as columns)."""

    layers: tuple[int, ...]
    fit_benign: dict[int, Tensor]
    fit_malicious: dict[int, Tensor]
    refusal: dict[int, Tensor]
    eigen: dict[int, tuple[Tensor, Tensor]]
    calibration: dict[int, Tensor]
    val_harmful: list[str]
    val_benign: list[str]
    val_harmful_acts: dict[int, Tensor]
    val_benign_acts: dict[int, Tensor]
    vanilla_harmful: Tensor
    vanilla_benign: Tensor
    refusal_ids: tuple[int, ...]
    n_fit_benign: int = 0
    calibration_groups: list[str] | None = None
    hook_template: str = RESID_PRE
    prompt_format: PromptFormat | str | None = None
    batch_size: int = 16
    meta: dict[str, Any] = field(default_factory=dict)
    probes: dict[tuple[tuple[int, ...], float], GateProbe] = field(default_factory=dict)

    def probe(self, layers: Sequence[int], C: float) -> GateProbe:
        """The :class:`GateProbe` of the two fit sides at ``layers`` (fitted once per
        ``(layers, C)``)."""
        key = (tuple(layers), float(C))
        if key not in self.probes:
            self.probes[key] = GateProbe.fit(
                self.fit_malicious, self.fit_benign, list(layers), C=float(C)
            )
        return self.probes[key]


def _by_layer(acts: Any, layers: Sequence[int]) -> dict[int, Tensor]:
    return {layer: acts[layer].detach().to(torch.float64).cpu() for layer in layers}


@torch.no_grad()
def prepare_search_data(
    model: HookedModel,
    *,
    layers: Sequence[int],
    fit_benign: Sequence[str],
    fit_malicious: Sequence[str],
    calibration: Sequence[str],
    val_harmful: Sequence[str],
    val_benign: Sequence[str],
    refusal: Mapping[int, Tensor] | None = None,
    refusal_harmful: Sequence[str] | None = None,
    calibration_groups: Sequence[str] | None = None,
    prompt_format: PromptFormat | str | None = None,
    batch_size: int = 16,
    allow_rank_deficient: bool = False,
    cache: bool | str | Path = False,
    progress: bool = True,
) -> SearchData:
    """Cache what the search needs (see the module docstring). ``refusal`` defaults to the
    difference in means of ``refusal_harmful`` (default: ``fit_malicious``) and ``fit_benign``
    at each layer. ``calibration`` must be benign prompts kept apart from ``fit_benign`` and the
    validation sets (the conformal guarantee needs them exchangeable with new benign prompts).
    ``calibration_groups`` (a label per calibration prompt) makes every calibrated trial bound
    each group's false-steer rate (see :meth:`CalibratedAlphaSteer.calibrate`)."""
    if calibration_groups is not None and len(calibration_groups) != len(calibration):
        raise ValueError(
            f"{len(calibration_groups)} calibration group labels for {len(calibration)} prompts"
        )
    layers = tuple(sorted({int(x) for x in layers}))
    if not layers:
        raise ValueError("no layers to search over")
    overlap = set(calibration) & (set(fit_benign) | set(val_benign))
    if overlap:
        raise ValueError(f"{len(overlap)} calibration prompts are also fit or validation prompts")
    kw: dict[str, Any] = dict(
        layers=list(layers), batch_size=batch_size, prompt_format=prompt_format,
        progress=progress, cache=cache,
    )  # fmt: skip
    b = _by_layer(cache_activations(model, list(fit_benign), desc="fit benign", **kw), layers)
    m = _by_layer(cache_activations(model, list(fit_malicious), desc="fit malicious", **kw), layers)
    cal = _by_layer(cache_activations(model, list(calibration), desc="calibration", **kw), layers)
    vh = _by_layer(cache_activations(model, list(val_harmful), desc="val harmful", **kw), layers)
    vb = _by_layer(cache_activations(model, list(val_benign), desc="val benign", **kw), layers)
    if refusal is None:
        if refusal_harmful is None:
            rh = m
        else:
            rh = _by_layer(
                cache_activations(model, list(refusal_harmful), desc="refusal", **kw), layers
            )
        refusal = {layer: diff_in_means(rh[layer], b[layer]) for layer in layers}
    missing = [layer for layer in layers if layer not in refusal]
    if missing:
        raise ValueError(f"refusal directions are missing layers {missing}")
    d = int(model.cfg.d_model)
    if len(fit_benign) < d and not allow_rank_deficient:
        raise ValueError(
            f"{len(fit_benign)} benign fit prompts for d_model={d}: the null space would hold "
            "directions no benign prompt was seen in; give more or pass allow_rank_deficient=True"
        )
    eigen = {}
    for layer in layers:
        hb = check_activations(b[layer], f"layer {layer}: benign activations", d)
        vals, vecs = torch.linalg.eigh(gram_lower(hb), UPLO="L")
        eigen[layer] = (vals, vecs)
    ids = RefusalTokens.from_tokenizer(model.tokenizer).ids
    score_kw: dict[str, Any] = dict(
        batch_size=batch_size, prompt_format=prompt_format, progress=progress
    )
    return SearchData(
        layers=layers,
        fit_benign=b,
        fit_malicious=m,
        refusal={layer: refusal[layer].detach().float().cpu() for layer in layers},
        eigen=eigen,
        calibration=cal,
        val_harmful=list(val_harmful),
        val_benign=list(val_benign),
        val_harmful_acts=vh,
        val_benign_acts=vb,
        vanilla_harmful=next_token_logits(
            model, list(val_harmful), desc="vanilla harmful", **score_kw
        ),
        vanilla_benign=next_token_logits(
            model, list(val_benign), desc="vanilla benign", **score_kw
        ),
        refusal_ids=ids,
        n_fit_benign=len(fit_benign),
        calibration_groups=None if calibration_groups is None else list(calibration_groups),
        prompt_format=prompt_format,
        batch_size=batch_size,
    )


def build_steering(data: SearchData, params: TrialParams) -> AlphaSteer | CalibratedAlphaSteer:
    """AlphaSteer on ``params``'s layer window from the cached fit data (null space = the
    eigenvectors of the ``round(ratio·d)`` smallest eigenvalues), calibrated when the gate is."""
    layers = [x for x in params.layers(max(data.layers)) if x in data.eigen]
    if not layers:
        raise ValueError(
            f"window {params.start}+{params.width} has no cached layer ({data.layers})"
        )
    ws, rs, leaks = [], [], []
    for layer in layers:
        vals, vecs = data.eigen[layer]
        d = vecs.shape[0]
        k = max(1, min(d - 1, int(round(params.ratio * d))))
        ns = NullSpace(basis=vecs[:, :k].contiguous(), eigenvalues=vals)
        ws.append(fit_steering_weights(ns, data.fit_malicious[layer], alpha=params.alpha))
        rs.append(data.refusal[layer].double())
        leaks.append(ns.leakage)
    base = AlphaSteer(
        layers=tuple(layers),
        w=torch.stack(ws).float(),
        r=torch.stack(rs).float(),
        hook_template=data.hook_template,
        alpha=params.alpha,
        ratio=params.ratio,
        leakage=tuple(leaks),
    )
    if params.gate == "none":
        return base
    if params.gate not in ("calibrated", "probe") or params.eps is None:
        raise ValueError(f"gate {params.gate!r} needs gate 'calibrated' or 'probe' and an eps")
    probe = None
    if params.gate == "probe":
        if params.probe_c is None:
            raise ValueError("gate 'probe' needs probe_c")
        probe = data.probe(layers, params.probe_c)
    gate = CalibratedAlphaSteer(base, margin=params.margin, probe=probe)
    return gate.calibrate_activations(
        data.calibration, params.eps, groups=data.calibration_groups, too_few="ignore"
    )


def _touched(steering: Any, acts: Mapping[int, Tensor]) -> Tensor:
    """Rows the steering changes at all (predicted exactly from unsteered activations)."""
    if isinstance(steering, CalibratedAlphaSteer):
        return steering.decisions(acts).gt(0).any(1)
    n = next(iter(acts.values())).shape[0]
    return torch.ones(n, dtype=torch.bool)


def _steered_logits(
    model: HookedModel, data: SearchData, steering: Any, strength: float,
    prompts: list[str], acts: Mapping[int, Tensor], vanilla: Tensor,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    touched = _touched(steering, acts)
    out = vanilla.clone()
    idx = touched.nonzero().flatten().tolist()
    if idx:
        out[idx] = next_token_logits(
            model, [prompts[i] for i in idx], steering=steering, strength=strength,
            batch_size=data.batch_size, prompt_format=data.prompt_format, progress=False,
        )  # fmt: skip
    return out, touched


@torch.no_grad()
def evaluate(model: HookedModel, data: SearchData, params: TrialParams) -> dict[str, float]:
    """The objectives (and diagnostics) of one setting on the validation sets."""
    steering = build_steering(data, params)
    lh, th = _steered_logits(model, data, steering, params.strength, data.val_harmful,
                             data.val_harmful_acts, data.vanilla_harmful)  # fmt: skip
    lb, tb = _steered_logits(model, data, steering, params.strength, data.val_benign,
                             data.val_benign_acts, data.vanilla_benign)  # fmt: skip
    ids = data.refusal_ids
    out = {
        "harmful_refusal": float(refusal_score(lh, ids).mean()),
        "benign_kl": float(first_token_kl(data.vanilla_benign, lb).mean()),
        "benign_refusal": float(refusal_score(lb, ids).mean()),
        "vanilla_harmful_refusal": float(refusal_score(data.vanilla_harmful, ids).mean()),
        "vanilla_benign_refusal": float(refusal_score(data.vanilla_benign, ids).mean()),
        "harmful_steered_frac": float(th.float().mean()),
        "benign_steered_frac": float(tb.float().mean()),
        "n_layers": float(len(steering.layers)),
    }
    if isinstance(steering, CalibratedAlphaSteer) and steering.tau is not None:
        out["tau"] = float(steering.tau[0])
    return out


def _suggest(trial: optuna.Trial, space: SearchSpace) -> TrialParams:
    start = trial.suggest_int("start", space.layer_min, space.layer_max)
    width = trial.suggest_int("width", space.width[0], space.width[1])
    strength = trial.suggest_float("strength", *space.strength, log=True)
    ratio = trial.suggest_float("ratio", *space.ratio)
    alpha = trial.suggest_float("alpha", *space.alpha, log=True)
    gate = trial.suggest_categorical("gate", list(space.gates))
    eps = trial.suggest_float("eps", *space.eps, log=True) if gate != "none" else None
    c = trial.suggest_float("probe_c", *space.probe_c, log=True) if gate == "probe" else None
    return TrialParams(start, width, strength, ratio, alpha, str(gate), eps, space.margin, c)


def run_study(
    model: HookedModel,
    data: SearchData,
    space: SearchSpace,
    *,
    n_trials: int,
    seed: int = 0,
    storage: str | Path | None = None,
    study_name: str = "alphasteer",
    population_size: int = 24,
    progress: bool = True,
    timeout: float | None = None,
) -> optuna.Study:
    """Run ``n_trials`` more trials of an NSGA-II study (seeded) on the cached data.

    ``storage``: an Optuna storage URL or a path to a ``.db`` file (SQLite); the study is created
    or, when it exists, resumed (trials are added to those already there). ``None`` keeps it in
    memory. Each trial's diagnostics are kept as user attributes.
    """
    import optuna

    url = None
    if storage is not None:
        url = str(storage)
        if "://" not in url:
            Path(url).expanduser().parent.mkdir(parents=True, exist_ok=True)
            url = f"sqlite:///{Path(url).expanduser().resolve()}"
    sampler = optuna.samplers.NSGAIISampler(seed=seed, population_size=population_size)
    study = optuna.create_study(
        study_name=study_name,
        storage=url,
        load_if_exists=True,
        sampler=sampler,
        directions=[optuna.study.StudyDirection[d.upper()] for _, d in OBJECTIVES],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names([n for n, _ in OBJECTIVES])
    study.set_user_attr("space", asdict(space))

    def objective(trial: optuna.Trial) -> tuple[float, ...]:
        params = _suggest(trial, space)
        res = evaluate(model, data, params)
        for k, v in res.items():
            trial.set_user_attr(k, v)
        return tuple(res[n] for n, _ in OBJECTIVES)

    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study.optimize(objective, n_trials=n_trials, timeout=timeout,
                       show_progress_bar=progress, gc_after_trial=False)  # fmt: skip
    finally:
        optuna.logging.set_verbosity(verbosity)
    return study


def trials_frame(study: optuna.Study) -> pd.DataFrame:
    """Every completed trial: ``number``, the parameters, the objectives, the diagnostics and
    ``pareto`` (on the Pareto front)."""
    import optuna
    import pandas as pd

    front = {t.number for t in study.best_trials}
    rows = []
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        row: dict[str, Any] = {"number": t.number}
        row.update({k: t.params.get(k) for k in ("start", "width", "strength", "ratio", "alpha",
                                                 "gate", "eps", "probe_c")})  # fmt: skip
        row.update(dict(zip([n for n, _ in OBJECTIVES], t.values, strict=True)))
        row.update({k: v for k, v in t.user_attrs.items() if k not in row})
        row["pareto"] = t.number in front
        rows.append(row)
    return pd.DataFrame(rows)


def pareto_frame(study: optuna.Study) -> pd.DataFrame:
    """The Pareto-optimal trials, highest harmful refusal first."""
    df = trials_frame(study)
    if df.empty:
        return df
    return df[df["pareto"]].sort_values("harmful_refusal", ascending=False).reset_index(drop=True)


def pareto_figure(trials: pd.DataFrame, *, title: str | None = None) -> go.Figure:
    """Harmful refusal log-odds (up) against benign first-token KL (left): every trial grey,
    the Pareto front coloured by benign refusal log-odds, marker shape by gate. Hover shows the
    settings."""
    import plotly.graph_objects as go

    fig = go.Figure()
    if trials.empty:
        return fig
    hover = [
        f"#{r.number} layers {r.start}+{r.width} λ={r.strength:.3g} ratio={r.ratio:.2f} "
        f"α={r.alpha:.3g} gate={r.gate}"
        + ("" if r.gate == "none" else f" ε={r.eps:.3g}")
        + (f" C={r.probe_c:.3g}" if r.gate == "probe" else "")
        for r in trials.itertuples()
    ]
    trials = trials.assign(hover=hover)
    rest = trials[~trials["pareto"]]
    fig.add_trace(go.Scatter(
        x=rest["benign_kl"], y=rest["harmful_refusal"], mode="markers", name="trials",
        marker={"color": "lightgrey", "size": 7}, text=rest["hover"], hoverinfo="text+x+y",
    ))  # fmt: skip
    front = trials[trials["pareto"]].sort_values("benign_kl")
    symbols = {"none": "circle", "calibrated": "diamond", "probe": "star"}
    for gate, part in front.groupby("gate"):
        fig.add_trace(go.Scatter(
            x=part["benign_kl"], y=part["harmful_refusal"], mode="markers",
            name=f"Pareto ({gate})", text=part["hover"], hoverinfo="text+x+y",
            marker={"size": 11, "symbol": symbols.get(str(gate), "square"),
                    "color": part["benign_refusal"], "colorscale": "Viridis", "showscale": True,
                    "colorbar": {"title": "benign refusal<br>log-odds"},
                    "line": {"width": 1, "color": "black"}},
        ))  # fmt: skip
    if "vanilla_harmful_refusal" in trials:
        v = float(trials["vanilla_harmful_refusal"].iloc[0])
        fig.add_hline(y=v, line_dash="dot", annotation_text="vanilla", line_color="grey")
    fig.update_layout(
        title=title or "AlphaSteer search: Pareto front",
        xaxis_title="benign first-token KL to vanilla (nats, ↓)",
        yaxis_title="harmful refusal log-odds (↑)",
        xaxis_type="log" if (trials["benign_kl"] > 0).all() else "linear",
        template="plotly_white", width=900, height=600,
    )  # fmt: skip
    return fig
