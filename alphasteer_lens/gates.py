"""Gated steering: steer only the prompts a score says to, with the threshold set by calibration.

Two gates on the one steering runtime (:mod:`alphasteer_lens.steering`):

- :class:`CalibratedAlphaSteer`: AlphaSteer's own score ``s_l = h_last·w_l`` with a **dead zone**.
  The prompt's gate score is the running maximum of its layer scores, ``m_l = max_{j ≤ l} s_j``
  (layers in model order); the steering added at layer ``l`` is ``g(m_l) · s_l · r_l`` with
  ``g(m) = clip((m − τ) / margin, 0, 1)`` (a linear ramp; ``margin=0``: a hard step). So nothing
  at all is added to a prompt whose every layer score is ``≤ τ``, and a prompt clearly above τ gets
  AlphaSteer's full steering. ``τ`` comes from **split-conformal calibration** on held-out benign
  prompts (:func:`conformal_threshold`): with exchangeable data, a new benign prompt from the
  calibration distribution is steered at all with probability ``≤ ε``. ``mode="layer"`` instead
  gates each layer on its own score with its own τ_l (no latch; the guarantee then holds per layer).
  With a :class:`GateProbe` (``probe=``) the gate reads a linear probe's logit instead of ``s_l``:
  a per-layer logistic regression of malicious (plain and jailbreak-wrapped) against benign
  (plain and sensitive-but-safe) fit prompts. The steering added when the gate is open is still
  AlphaSteer's ``s_l · r_l``; only *whether* to steer changes. AlphaSteer's score is a regression
  target ("map malicious to r, benign to 0") and reads "sounds harmful"; the probe is trained to
  tell the two classes apart, wrapped harm and safe-but-sensitive prompts included. A probe may
  also read the mean of the layer's input over the prompt's tokens (``reads="last+mean"``,
  fitted on ``cache_activations(positions="last+mean")``); the hook then takes that mean during
  the prefill, so cached and run-time gate scores are the same function of the same pass.
  ``steer="actadd"`` keeps the gate and adds ``g · r_l`` instead (ActAdd of the refusal
  directions behind the calibrated gate): the gate decides whether, ActAdd how much.
- :class:`Cast`: the CAST baseline (IBM activation-steering, ICLR 2025): the cosine of ``h_last``
  with a condition direction at one condition layer, compared with a threshold chosen by F1 on a
  grid, switches ActAdd of the refusal vectors at the steered layers on or off for the prompt.

Why a per-prompt decision (``mode="prompt"``) and why the plain maximum: see ``docs/GATES.md``.
In short, AlphaSteer's fit already puts every layer's score on one scale (malicious rows ≈ 1), so
``max_l s_l`` is one calibrated number per prompt; the first layer a prompt fires at sees unsteered
activations, so the scores of a never-firing prompt computed from cached (unsteered) activations
are exactly the ones the hooks see, and the guarantee on cached scores is the guarantee at run time.

:func:`gate_report` and :func:`gate_histogram` turn cached activations into per-layer scores and
decisions (which prompts fired, at which layer) and a histogram figure per layer.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from alphasteer_lens.activations import last_token
from alphasteer_lens.alphasteer import AlphaSteer
from alphasteer_lens.hookpoints import RESID_PRE, check_template, hook_name

if TYPE_CHECKING:
    import pandas as pd
    import plotly.graph_objects as go

GateMode = Literal["prompt", "layer"]
ProbeReads = Literal["last", "last+mean"]
TooFew = Literal["warn", "raise", "ignore"]
GatedSteer = Literal["alphasteer", "actadd"]

__all__ = [
    "CalibratedAlphaSteer",
    "Cast",
    "ConformalWarning",
    "GateProbe",
    "best_threshold_f1",
    "conformal_rank",
    "conformal_threshold",
    "condition_direction",
    "false_steer_rate",
    "gate_histogram",
    "gate_report",
    "held_out_false_steer",
    "last_token",
]


class ConformalWarning(UserWarning):
    """Too few calibration scores for the requested ε: the threshold is +inf (never steer)."""


# ---------------------------------------------------------------------------------------------
# Split-conformal threshold


def _as_scores(scores: Any, what: str = "scores") -> np.ndarray:
    x = scores.detach().double().cpu().numpy() if isinstance(scores, Tensor) else scores
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"{what} must be 1-D (one score per prompt), got shape {x.shape}")
    if x.size == 0:
        raise ValueError(f"{what} are empty: calibration needs at least one benign prompt")
    if not np.isfinite(x).all():
        raise ValueError(f"{what} contain NaN or inf")
    return x


def _check_eps(eps: float) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0.0 < float(eps) < 1.0:
        raise ValueError(f"eps (the benign false-steer rate) must be in (0, 1), got {eps!r}")
    return float(eps)


def conformal_rank(n: int, eps: float) -> int:
    """``k = ⌈(n+1)(1−ε)⌉``: the rank (1-based, ascending) of the split-conformal threshold among
    ``n`` calibration scores. ``k > n`` means n is too small for this ε (n < 1/ε − 1)."""
    eps = _check_eps(eps)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    # Exact rational arithmetic for the ceiling: (n+1)(1-ε) in floats can land a hair above an
    # integer (e.g. 100 * 0.99 = 99.00000000000001) and push k up by one.
    from fractions import Fraction

    return math.ceil((n + 1) * (1 - Fraction(eps).limit_denominator(10**12)))


def conformal_threshold(scores: Any, eps: float, *, too_few: TooFew = "warn") -> float:
    """Split-conformal threshold: ``τ`` = the ``⌈(n+1)(1−ε)⌉``-th smallest of the ``n`` benign
    calibration scores.

    For a new benign score ``s`` exchangeable with the calibration scores, ``P(s > τ) ≤ ε``
    (and ``≥ ε − 1/(n+1)`` without ties); gate a steering on ``s > τ`` and at most ε of such
    prompts are steered. Ties only make it more conservative.

    When ``⌈(n+1)(1−ε)⌉ > n`` (fewer than ``1/ε − 1`` scores) no finite threshold has the
    guarantee and ``τ = +inf`` (never steer). ``too_few`` says what else happens then: "warn"
    (default) issues a :class:`ConformalWarning` naming how many scores are needed, "raise" raises
    ``ValueError``, "ignore" is silent.
    """
    x = _as_scores(scores, "calibration scores")
    n = int(x.size)
    k = conformal_rank(n, eps)
    if k > n:
        need = math.ceil((1 - eps) / eps - 1e-12)
        msg = (
            f"conformal_threshold: {n} calibration scores are too few for eps={eps} (need at least "
            f"{need}); the threshold is +inf, so the gate never steers"
        )
        if too_few == "raise":
            raise ValueError(msg)
        if too_few == "warn":
            warnings.warn(msg, ConformalWarning, stacklevel=2)
        elif too_few != "ignore":
            raise ValueError(f"too_few must be 'warn', 'raise' or 'ignore', got {too_few!r}")
        return math.inf
    return float(np.partition(x, k - 1)[k - 1])


def false_steer_rate(scores: Any, tau: float) -> float:
    """The fraction of scores strictly above ``tau``: the realised false-steer rate of benign
    prompts (the gate fires on ``s > τ``)."""
    x = _as_scores(scores)
    return float((x > tau).mean())


# ---------------------------------------------------------------------------------------------
# Calibrated AlphaSteer


def _layer_order(layers: Sequence[int]) -> list[int | None]:
    """For each index i of ``layers``, the index of the nearest earlier layer (or None)."""
    order = sorted(range(len(layers)), key=lambda i: layers[i])
    prev: list[int | None] = [None] * len(layers)
    for a, b in zip(order, order[1:], strict=False):
        prev[b] = a
    return prev


def _scores_matrix(
    base: AlphaSteer, scores: Mapping[int, Any] | Tensor | np.ndarray
) -> Float[Tensor, "n layer"]:
    """Benign scores as ``[n, n_layers]`` float64 in ``base.layers`` order."""
    if isinstance(scores, Mapping):
        missing = [layer for layer in base.layers if layer not in scores]
        if missing:
            raise ValueError(f"benign scores are missing layers {missing} (have {sorted(scores)})")
        cols = [torch.as_tensor(np.asarray(_as_scores(scores[layer], f"layer {layer} scores")))
                for layer in base.layers]  # fmt: skip
        if len({c.shape[0] for c in cols}) != 1:
            raise ValueError("benign scores hold different numbers of prompts per layer")
        return torch.stack(cols, 1)
    m = torch.as_tensor(np.asarray(scores, dtype=np.float64))
    if m.ndim != 2 or m.shape[1] != len(base.layers):
        raise ValueError(
            f"benign scores must be a mapping layer -> [n] or an [n, {len(base.layers)}] array, "
            f"got shape {tuple(m.shape)}"
        )
    if not torch.isfinite(m).all():
        raise ValueError("benign scores contain NaN or inf")
    return m


PROBE_C_GRID = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)


def _features(h: Tensor, reads: ProbeReads, who: str) -> Tensor:
    """A probe's input rows: the last token, or the last token and the prompt mean side by side
    (``[n, 2d]``) from ``[n, 2, d]`` activations."""
    if reads == "last":
        return last_token(h)
    if h.ndim != 3 or h.shape[1] != 2:
        raise ValueError(
            f"{who}: a probe that reads 'last+mean' needs [n, 2, d] activations (cache them with "
            f"positions='last+mean'), got shape {tuple(h.shape)}"
        )
    return h.reshape(h.shape[0], -1)


def _probe_data(
    malicious: Mapping[int, Tensor],
    benign: Mapping[int, Tensor],
    layer: int,
    who: str,
    reads: ProbeReads = "last",
) -> tuple[np.ndarray, np.ndarray]:
    """One layer's probe training data: rows ``[malicious; benign]`` (float64) and labels 1/0,
    checked (both sides present, non-empty, one d, finite)."""
    if layer not in malicious or layer not in benign:
        raise ValueError(f"{who}: no activations for layer {layer}")
    a = _features(malicious[layer].detach().double().cpu(), reads, who)
    z = _features(benign[layer].detach().double().cpu(), reads, who)
    if a.ndim != 2 or z.ndim != 2 or a.shape[1] != z.shape[1] or not len(a) or not len(z):
        raise ValueError(
            f"{who}: layer {layer} needs two non-empty [n, d] sets of one d, got "
            f"{tuple(a.shape)} and {tuple(z.shape)}"
        )
    x = torch.cat([a, z]).numpy()
    if not np.isfinite(x).all():
        raise ValueError(f"{who}: layer {layer} activations contain NaN or inf")
    return x, np.r_[np.ones(len(a)), np.zeros(len(z))]


@dataclass(frozen=True)
class GateProbe:
    """A linear gate score per steered layer: ``z_l = h_last·u_l + b_l`` (a logistic-regression
    logit, malicious > 0), or with ``u_mean`` ``z_l = h_last·u_l + h̄·u_mean_l + b_l`` where
    ``h̄`` is the mean of the layer's input over the prompt's tokens (``reads == "last+mean"``).
    Fit with :meth:`fit`; ``u`` and ``u_mean`` are ``[n_layers, d_model]``, ``b``
    ``[n_layers]``, all float64, in the steering's layer order."""

    layers: tuple[int, ...]
    u: Float[Tensor, "layer d_model"]
    b: Float[Tensor, " layer"]
    C: float = 0.1
    u_mean: Float[Tensor, "layer d_model"] | None = None

    def __post_init__(self) -> None:
        u = torch.as_tensor(self.u).detach().double().cpu()
        b = torch.as_tensor(self.b).detach().double().cpu()
        n = len(self.layers)
        if u.ndim != 2 or u.shape[0] != n or b.shape != (n,):
            raise ValueError(
                f"GateProbe needs u [{n}, d_model] and b [{n}] for layers {list(self.layers)}, "
                f"got u {tuple(u.shape)} and b {tuple(b.shape)}"
            )
        weights = [u, b]
        if self.u_mean is not None:
            um = torch.as_tensor(self.u_mean).detach().double().cpu()
            if um.shape != u.shape:
                raise ValueError(
                    f"GateProbe u_mean has shape {tuple(um.shape)}, u has {tuple(u.shape)}"
                )
            object.__setattr__(self, "u_mean", um)
            weights.append(um)
        if not all(torch.isfinite(t).all() for t in weights):
            raise ValueError("GateProbe weights contain NaN or inf")
        object.__setattr__(self, "layers", tuple(int(x) for x in self.layers))
        object.__setattr__(self, "u", u)
        object.__setattr__(self, "b", b)

    @property
    def reads(self) -> ProbeReads:
        """What the probe reads: ``"last"`` (the last prompt token) or ``"last+mean"`` (and the
        mean over the prompt's tokens)."""
        return "last" if self.u_mean is None else "last+mean"

    @classmethod
    def fit(
        cls,
        malicious: Mapping[int, Tensor],
        benign: Mapping[int, Tensor],
        layers: Sequence[int],
        *,
        C: float = 0.1,
        seed: int = 0,
        reads: ProbeReads = "last",
    ) -> GateProbe:
        """One L2-regularised logistic regression per layer on standardised activations,
        classes weighted to balance; the standardisation is folded into ``u`` (and ``u_mean``)
        and ``b`` so the runtime does one dot product per prompt. ``reads="last"``: last-token
        activations ``{layer: [n, d]}`` (or ``[n, 2, d]``, of which the last token is used);
        ``"last+mean"``: ``{layer: [n, 2, d]}`` (last token, prompt mean) from
        ``cache_activations(positions="last+mean")``, both read side by side."""
        from sklearn.linear_model import LogisticRegression

        if not (isinstance(C, (int, float)) and math.isfinite(C) and C > 0):
            raise ValueError(f"C (inverse regularisation strength) must be finite and > 0, got {C}")
        _check_reads(reads)
        us, bs = [], []
        for layer in layers:
            x, y = _probe_data(malicious, benign, layer, "GateProbe.fit", reads)
            mu, sd = x.mean(0), x.std(0) + 1e-6
            clf = LogisticRegression(C=C, max_iter=5000, class_weight="balanced", random_state=seed)
            clf.fit((x - mu) / sd, y)
            coef = clf.coef_[0] / sd
            us.append(torch.from_numpy(coef))
            bs.append(float(clf.intercept_[0] - mu @ coef))
        u, b = torch.stack(us), torch.tensor(bs, dtype=torch.float64)
        if reads == "last":
            return cls(tuple(layers), u, b, float(C))
        d = u.shape[1] // 2
        return cls(tuple(layers), u[:, :d], b, float(C), u[:, d:])

    def save(self, path: str | Path, *, cv_log_loss: Mapping[str, float] | None = None) -> Path:
        """Write the probe atomically (safetensors ``u`` and ``b`` in float64, metadata
        ``layers``, ``C`` and the optional cross-validation table ``{C: log-loss}``), so a
        resumed run reuses it bit for bit instead of refitting it."""
        from alphasteer_lens.storage import atomic_save_safetensors

        meta = {"kind": "gate_probe", "layers": list(self.layers), "C": self.C}
        meta["cv_log_loss"] = dict(cv_log_loss or {})
        tensors = {"u": self.u, "b": self.b}
        if self.u_mean is not None:
            tensors["u_mean"] = self.u_mean
        atomic_save_safetensors(tensors, path, meta)
        return Path(path)

    @classmethod
    def load(
        cls, path: str | Path, *, layers: Sequence[int], d_model: int
    ) -> tuple[GateProbe, dict[str, float]]:
        """A probe written by :meth:`save`, checked (content hash, kind, the expected ``layers``
        and ``d_model``, finite ``C > 0``) with its cross-validation table; any mismatch is an
        :class:`~alphasteer_lens.storage.ArtifactError` naming the file and the value."""
        import json

        from alphasteer_lens.storage import ArtifactError, load_safetensors_checked

        tensors, meta = load_safetensors_checked(path)

        def field_(name: str) -> Any:
            try:
                return json.loads(meta[name]) if name != "kind" else meta[name]
            except (KeyError, json.JSONDecodeError) as e:
                raise ArtifactError(f"{path}: metadata field {name!r} missing or not JSON") from e

        if field_("kind") != "gate_probe":
            raise ArtifactError(f"{path}: not a gate probe (kind {field_('kind')!r})")
        got, want = field_("layers"), [int(x) for x in layers]
        if got != want:
            raise ArtifactError(f"{path}: probe layers {got!r}, expected {want}")
        c, cv = field_("C"), field_("cv_log_loss")
        if not (isinstance(c, (int, float)) and math.isfinite(c) and c > 0):
            raise ArtifactError(f"{path}: probe C must be a finite number > 0, got {c!r}")
        if not isinstance(cv, dict) or not all(
            isinstance(v, (int, float)) for v in cv.values()
        ):  # fmt: skip
            raise ArtifactError(f"{path}: cv_log_loss must map C to a number, got {cv!r}")
        if set(tensors) not in ({"u", "b"}, {"u", "b", "u_mean"}):
            raise ArtifactError(
                f"{path}: probe tensors {sorted(tensors)}, expected ['b', 'u'] (and 'u_mean')"
            )
        u = tensors["u"]
        if u.ndim != 2 or u.shape[1] != d_model:
            raise ArtifactError(f"{path}: probe u has shape {tuple(u.shape)}, d_model is {d_model}")
        try:
            probe = cls(tuple(want), u, tensors["b"], float(c), tensors.get("u_mean"))
        except ValueError as e:
            raise ArtifactError(f"{path}: {e}") from e
        return probe, {str(k): float(v) for k, v in cv.items()}

    @staticmethod
    def select_c(
        malicious: Mapping[int, Tensor],
        benign: Mapping[int, Tensor],
        layers: Sequence[int],
        *,
        grid: Sequence[float] = PROBE_C_GRID,
        folds: int = 3,
        seed: int = 0,
        reads: ProbeReads = "last",
    ) -> tuple[float, pd.DataFrame]:
        """The ``C`` of ``grid`` with the lowest mean cross-validated log-loss (stratified
        ``folds``-fold, classes weighted to balance, standardised inside each fold) over
        ``layers``, and the table of every ``(C, layer)`` loss, for a probe that ``reads`` what
        :meth:`fit` would. Uses the fit data only, so the choice never sees calibration or test
        prompts."""
        import pandas as pd
        from sklearn.linear_model import LogisticRegression
        from sklearn.model_selection import StratifiedKFold, cross_val_score
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        _check_reads(reads)
        cs = [float(c) for c in grid]
        if not cs or not all(math.isfinite(c) and c > 0 for c in cs):
            raise ValueError(f"grid must hold finite C > 0, got {list(grid)}")
        rows = []
        for layer in layers:
            x, y = _probe_data(malicious, benign, layer, "GateProbe.select_c", reads)
            n_mal = int(y.sum())
            n_ben = len(y) - n_mal
            if folds < 2 or min(n_mal, n_ben) < folds:
                raise ValueError(
                    f"GateProbe.select_c: {folds} folds need at least {max(folds, 2)} prompts per "
                    f"side, layer {layer} has {n_mal} malicious and {n_ben} benign"
                )
            split = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
            for c in cs:
                clf = LogisticRegression(
                    C=c, max_iter=5000, class_weight="balanced", random_state=seed
                )
                loss = -cross_val_score(
                    make_pipeline(StandardScaler(), clf), x, y, cv=split, scoring="neg_log_loss"
                )
                rows.append({"C": c, "layer": int(layer), "log_loss": float(loss.mean())})
        table = pd.DataFrame(rows)
        mean = table.groupby("C", sort=True).log_loss.mean()
        return float(mean.idxmin()), table

    def scores(self, i: int, h: Tensor) -> Tensor:
        """The logit of layer index ``i`` (float64) for rows ``h``: ``[n, d]`` last-token
        activations, or ``[n, 2, d]`` (last token, prompt mean), which a ``"last+mean"`` probe
        needs."""
        z = last_token(h).double() @ self.u[i].to(h.device) + float(self.b[i])
        if self.u_mean is None:
            return z
        _features(h, "last+mean", "GateProbe.scores")  # checks the [n, 2, d] shape
        return z + h[:, 1].double() @ self.u_mean[i].to(h.device)


def _check_reads(reads: str) -> None:
    if reads not in ("last", "last+mean"):
        raise ValueError(f"reads must be 'last' or 'last+mean', got {reads!r}")


@dataclass(frozen=True)
class CalibratedAlphaSteer:
    """AlphaSteer with a conformally calibrated dead zone (see the module docstring).

    ``tau`` is one threshold per layer (``mode="prompt"`` uses the same value at every layer); it
    is ``None`` until :meth:`calibrate` (a steering with ``tau=None`` refuses to run). ``margin``
    is the width of the linear ramp above τ (0: a hard step). ``eps`` and ``n_calibration`` record
    how τ was made; ``scale`` divides each layer's score before gating (default 1: AlphaSteer's fit
    already maps malicious prompts to ≈ 1 at every layer). ``probe``: a :class:`GateProbe` whose
    logit is the gate score instead of ``s_l``. ``steer``: what an open gate adds, AlphaSteer's
    ``g · s_l · r_l`` (default) or ``"actadd"``: ``g · r_l``, ActAdd of AlphaSteer's refusal
    directions behind the same calibrated gate (the gate, τ and its guarantee are unchanged).
    """

    base: AlphaSteer
    tau: tuple[float, ...] | None = None
    margin: float = 0.25
    mode: GateMode = "prompt"
    eps: float | None = None
    n_calibration: int = 0
    scale: tuple[float, ...] | None = None
    probe: GateProbe | None = None
    steer: GatedSteer = "alphasteer"
    default_positions: ClassVar[str] = "prompt"

    def __post_init__(self) -> None:
        if not isinstance(self.base, AlphaSteer):
            raise ValueError(f"base must be an AlphaSteer, got {type(self.base).__name__}")
        if self.steer not in ("alphasteer", "actadd"):
            raise ValueError(f"steer must be 'alphasteer' or 'actadd', got {self.steer!r}")
        if self.mode not in ("prompt", "layer"):
            raise ValueError(f"mode must be 'prompt' or 'layer', got {self.mode!r}")
        if not (math.isfinite(self.margin) and self.margin >= 0):
            raise ValueError(f"margin must be a finite number >= 0, got {self.margin}")
        n = len(self.base.layers)
        for name in ("tau", "scale"):
            v = getattr(self, name)
            if v is None:
                continue
            v = tuple(float(x) for x in v)
            if len(v) != n:
                raise ValueError(f"{name} has {len(v)} values for {n} layers")
            if any(math.isnan(x) for x in v):
                raise ValueError(f"{name} contains NaN")
            object.__setattr__(self, name, v)
        if self.scale is not None and any(not (s > 0 and math.isfinite(s)) for s in self.scale):
            raise ValueError(f"scale values must be finite and > 0, got {self.scale}")
        if self.probe is not None:
            if not isinstance(self.probe, GateProbe):
                raise ValueError(f"probe must be a GateProbe, got {type(self.probe).__name__}")
            if self.probe.layers != tuple(self.base.layers):
                raise ValueError(
                    f"probe layers {list(self.probe.layers)} differ from the steering's "
                    f"{list(self.base.layers)}"
                )
            if self.probe.u.shape[1] != self.base.r.shape[-1]:
                raise ValueError(
                    f"probe d_model {self.probe.u.shape[1]} differs from the steering's "
                    f"{self.base.r.shape[-1]}"
                )
            if self.scale is not None:
                raise ValueError("give either probe or scale, not both (scale divides s_l)")
        object.__setattr__(self, "_prev", tuple(_layer_order(self.base.layers)))

    # The runtime reads these.
    @property
    def layers(self) -> tuple[int, ...]:
        return self.base.layers

    @property
    def hook_template(self) -> str:
        return self.base.hook_template

    @property
    def r(self) -> Tensor:
        return self.base.r

    @property
    def w(self) -> Tensor:
        return self.base.w

    def hook_name(self, layer: int) -> str:
        return self.base.hook_name(layer)

    # Scores and calibration.
    def layer_scores(self, acts: Mapping[int, Tensor]) -> Float[Tensor, "n layer"]:
        """The gate's layer scores (``s_l / scale_l``, or the probe's logit) per prompt and
        steered layer from cached (unsteered) last-token activations ``{layer: [n, d]}``
        (float64, ``base.layers`` order)."""
        return self._scale(self._raw_scores(acts))

    def _raw_scores(self, acts: Mapping[int, Tensor]) -> Float[Tensor, "n layer"]:
        if self.probe is not None:
            cols = [self.probe.scores(i, acts[x]).cpu() for i, x in enumerate(self.layers)]
            return torch.stack(cols, 1)
        cols = [
            self.base.malicious_scores(layer, last_token(acts[layer])).cpu()
            for layer in self.layers
        ]
        return torch.stack(cols, 1).double()

    def _scale(self, s: Tensor) -> Tensor:
        if self.scale is not None:
            s = s / torch.tensor(self.scale, dtype=torch.float64)
        return s

    def gate_scores(self, scores: Float[Tensor, "n layer"]) -> Float[Tensor, "n layer"]:
        """What is compared with τ at each layer: the running maximum over earlier layers (in
        model order) for ``mode="prompt"``, the layer's own score for ``mode="layer"``."""
        if self.mode == "layer":
            return scores
        order = sorted(range(len(self.layers)), key=lambda i: self.layers[i])
        out = scores.clone()
        out[:, order] = torch.cummax(scores[:, order], dim=1).values
        return out

    def prompt_scores(self, scores: Float[Tensor, "n layer"]) -> Float[Tensor, " n"]:
        """One conformal score per prompt for ``mode="prompt"``: ``max_l s_l``."""
        return scores.max(1).values

    def calibrate(
        self,
        benign_scores_per_layer: Mapping[int, Any] | Tensor | np.ndarray,
        eps: float = 0.02,
        *,
        groups: Sequence[Any] | None = None,
        too_few: TooFew = "warn",
    ) -> CalibratedAlphaSteer:
        """A copy with τ set by split conformal on benign calibration scores (``{layer: [n]}`` or
        ``[n, n_layers]``, each ``h_last·w_l`` of a held-out benign prompt, before ``scale``;
        with a ``probe``, its logits).

        ``mode="prompt"``: τ = :func:`conformal_threshold` of ``max_l s_l`` at ε, the same at
        every layer, so ``P(a new benign prompt is steered at any layer) ≤ ε``. ``mode="layer"``:
        τ_l of each layer's own scores at ε (each layer fires on ≤ ε of benign prompts; the
        chance that some layer does is at most ``len(layers)·ε``). Keep the calibration prompts
        apart from those that fitted ``w`` or chose λ: the guarantee needs them exchangeable with
        the new prompts, which fit data are not.

        ``groups`` (one label per calibration prompt, e.g. its source: plain benign, CoCoNot,
        borderline) calibrates each group on its own and keeps the largest τ (Mondrian / group-
        conditional split conformal): the bound then holds for each group's distribution, not
        only for the mixture the calibration pool happens to be."""
        eps = _check_eps(eps)
        s = self._scale(_scores_matrix(self.base, benign_scores_per_layer))
        return replace(
            self,
            tau=self._thresholds(s, eps, groups, too_few),
            eps=eps,
            n_calibration=int(s.shape[0]),
        )

    def _thresholds(
        self, s: Tensor, eps: float, groups: Sequence[Any] | None, too_few: TooFew
    ) -> tuple[float, ...]:
        if groups is not None:
            labels = list(groups)
            if len(labels) != s.shape[0]:
                raise ValueError(f"{len(labels)} group labels for {s.shape[0]} calibration scores")
            parts = [
                self._thresholds(
                    s[[i for i, g in enumerate(labels) if g == lab]], eps, None, too_few
                )
                for lab in dict.fromkeys(labels)
            ]
            return tuple(max(col) for col in zip(*parts, strict=True))
        if self.mode == "prompt":
            return (conformal_threshold(self.prompt_scores(s), eps, too_few=too_few),) * s.shape[1]
        return tuple(conformal_threshold(s[:, i], eps, too_few=too_few) for i in range(s.shape[1]))

    def calibrate_activations(
        self,
        benign: Mapping[int, Tensor],
        eps: float = 0.02,
        *,
        groups: Sequence[Any] | None = None,
        too_few: TooFew = "warn",
    ) -> CalibratedAlphaSteer:
        """:meth:`calibrate` from cached benign last-token activations ``{layer: [n, d]}``."""
        return self.calibrate(self._raw_scores(benign), eps, groups=groups, too_few=too_few)

    def _tau(self) -> Tensor:
        if self.tau is None:
            raise RuntimeError(
                "CalibratedAlphaSteer has no threshold yet: call .calibrate(benign_scores, eps) "
                "with held-out benign calibration scores"
            )
        return torch.tensor(self.tau, dtype=torch.float64)

    def gate(self, gate_scores: Tensor, i: int | None = None) -> Tensor:
        """The gate factor ``clip((m − τ)/margin, 0, 1)`` (hard step for margin 0): exactly 0
        where ``m ≤ τ``. ``i`` picks one layer's τ; else ``gate_scores`` is ``[n, n_layers]``."""
        tau = self._tau().to(gate_scores.device)
        t = tau[i] if i is not None else tau
        g = gate_scores.double() - t
        if self.margin == 0:
            return (g > 0).to(torch.float64)
        return (g / self.margin).clamp(0.0, 1.0)

    def decisions(self, acts: Mapping[int, Tensor]) -> Float[Tensor, "n layer"]:
        """Gate factors per prompt and layer predicted from cached unsteered activations. Exact
        for every prompt up to the first layer it fires at (later layers see steered inputs)."""
        return self.gate(self.gate_scores(self.layer_scores(acts)))

    # Runtime.
    def delta(self, i: int, h: Float[Tensor, "batch pos d_model"], state: Any) -> Tensor:
        """``g_i · s_i · r_i`` (``steer="actadd"``: ``g_i · r_i``) for every position (the
        runtime applies λ and the mask). During the prefill each layer reads ``s_i`` at the last
        prompt token, forms the gate score (the running max with the previous layer's, kept in
        ``state.memo``) and keeps ``g_i · s_i`` for the decode steps."""
        key = ("calibrated_alphasteer", id(self), i)
        last = state.last_prompt(h)
        if last is not None:
            self._tau()  # raises before any state is touched when uncalibrated
            s = self.base.scores(i, last).double()
            if self.probe is not None and self.probe.u_mean is not None:
                m = self.probe.scores(i, torch.stack([last, state.prompt_mean(h)], 1))
            elif self.probe is not None:
                m = self.probe.scores(i, last)
            else:
                m = s / self.scale[i] if self.scale is not None else s
            prev = self._prev[i]  # type: ignore[attr-defined]
            if self.mode == "prompt" and prev is not None:
                before = state.memo.get(("calibrated_alphasteer_max", id(self), prev))
                if before is None:
                    raise RuntimeError(
                        f"CalibratedAlphaSteer: layer {self.layers[i]} ran before layer "
                        f"{self.layers[prev]} in this pass; layers must run in model order"
                    )
                m = torch.maximum(m, before.to(m.device))
            state.memo[("calibrated_alphasteer_max", id(self), i)] = m
            g = self.gate(m, i)
            state.memo[key] = (g * s if self.steer == "alphasteer" else g).to(torch.float32)
        elif key not in state.memo:
            raise RuntimeError(
                "CalibratedAlphaSteer: a decode step came before any prefill of its prompt"
            )
        coef = state.memo[key].to(h.device)
        return coef.reshape(-1, 1, 1) * self.base.r[i].to(h.device)


# ---------------------------------------------------------------------------------------------
# CAST


def condition_direction(
    harmful: Float[Tensor, "n d_model"],
    benign: Float[Tensor, "m d_model"],
    *,
    method: Literal["mean_diff", "pca"] = "mean_diff",
) -> Float[Tensor, " d_model"]:
    """A unit condition direction at one layer, pointing toward the harmful side: the
    difference of means, or (as IBM's CAST) the first principal component of the pooled,
    centred activations, signed so that harmful prompts project above benign ones."""
    a = harmful.detach().double().cpu()
    b = benign.detach().double().cpu()
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or not len(a) or not len(b):
        raise ValueError(
            f"condition_direction needs two non-empty [n, d] sets of one d, got "
            f"{tuple(a.shape)} and {tuple(b.shape)}"
        )
    diff = a.mean(0) - b.mean(0)
    if method == "mean_diff":
        v = diff
    elif method == "pca":
        x = torch.cat([a, b])
        x = x - x.mean(0)
        _, _, vh = torch.linalg.svd(x, full_matrices=False)
        v = vh[0]
        if float(v @ diff) < 0:
            v = -v
    else:
        raise ValueError(f"method must be 'mean_diff' or 'pca', got {method!r}")
    norm = float(v.norm())
    if norm == 0:
        raise ValueError("condition direction is the zero vector (identical sets?)")
    return (v / norm).to(torch.float32)


def _cosine(h: Tensor, c: Tensor) -> Tensor:
    h = h.double()
    c = c.to(h.device, torch.float64)
    return (h @ c) / (h.norm(dim=-1) * c.norm()).clamp_min(1e-30)


def best_threshold_f1(
    positive: Any, negative: Any, grid: Sequence[float] | np.ndarray | None = None
) -> tuple[float, float]:
    """The threshold θ of a grid maximising F1 of "score ≥ θ means positive" (ties: the
    largest θ, i.e. the fewest benign prompts steered); returns ``(θ, F1)``. The default grid is
    every observed score (which the best F1 over any threshold is attained at), as IBM's grid
    search over cosine thresholds does with a fixed step."""
    pos = _as_scores(positive, "positive scores")
    neg = _as_scores(negative, "negative scores")
    cand = np.unique(np.concatenate([pos, neg])) if grid is None else np.asarray(grid, float)
    if cand.ndim != 1 or cand.size == 0:
        raise ValueError("threshold grid is empty")
    tp = (pos[None, :] >= cand[:, None]).sum(1)
    fp = (neg[None, :] >= cand[:, None]).sum(1)
    fn = pos.size - tp
    f1 = np.where(tp > 0, 2 * tp / np.maximum(2 * tp + fp + fn, 1), 0.0)
    best = np.flatnonzero(f1 == f1.max())
    j = best[np.argmax(cand[best])]
    return float(cand[j]), float(f1[j])


@dataclass(frozen=True)
class Cast:
    """CAST (conditional activation steering): a per-prompt condition gating ActAdd.

    At ``condition_layer`` the cosine of ``h_last`` with ``condition`` (unit) is compared with
    ``threshold``; if ``≥`` (``comparator="ge"``; ``"le"`` flips it) the prompt gets ``λ v_l`` at
    every steered layer, else nothing. ``layers`` are the hook points this steering needs: the
    steered layers plus the condition layer (its vector row is zero when it is not steered).
    The condition layer must not come after the first steered layer (the decision must exist
    before it is used); the decision is kept in ``state.memo`` for the decode steps.
    """

    condition_layer: int
    condition: Float[Tensor, " d_model"]
    threshold: float
    steer_layers: tuple[int, ...]
    steer_vectors: Float[Tensor, "layer d_model"]
    hook_template: str = RESID_PRE
    comparator: Literal["ge", "le"] = "ge"
    f1: float | None = None
    layers: tuple[int, ...] = field(init=False)
    vectors: Tensor = field(init=False)
    default_positions: ClassVar[str] = "prompt"

    def __post_init__(self) -> None:
        steer = tuple(int(x) for x in self.steer_layers)
        if not steer or len(set(steer)) != len(steer) or min(steer) < 0:
            raise ValueError(f"Cast: steer_layers must be unique non-negative ints, got {steer}")
        v = self.steer_vectors
        if not isinstance(v, Tensor) or v.ndim != 2 or v.shape[0] != len(steer):
            raise ValueError("Cast: steer_vectors must be [len(steer_layers), d_model]")
        c = self.condition
        if not isinstance(c, Tensor) or c.ndim != 1 or c.shape[0] != v.shape[1]:
            raise ValueError(f"Cast: condition must be a [{v.shape[1]}] vector")
        if float(c.norm()) == 0 or not torch.isfinite(c).all() or not torch.isfinite(v).all():
            raise ValueError("Cast: condition must be a finite non-zero vector, vectors finite")
        if int(self.condition_layer) > min(steer):
            raise ValueError(
                f"Cast: condition layer {self.condition_layer} comes after the first steered "
                f"layer {min(steer)}; the decision would be made too late"
            )
        if self.comparator not in ("ge", "le"):
            raise ValueError(f"comparator must be 'ge' or 'le', got {self.comparator!r}")
        if not math.isfinite(self.threshold):
            raise ValueError(f"threshold must be finite, got {self.threshold}")
        check_template(self.hook_template)
        cl = int(self.condition_layer)
        layers = tuple(sorted(set(steer) | {cl}))
        rows = []
        for layer in layers:
            rows.append(v[steer.index(layer)] if layer in steer else torch.zeros_like(v[0]))
        object.__setattr__(self, "condition_layer", cl)
        object.__setattr__(self, "steer_layers", steer)
        object.__setattr__(self, "steer_vectors", v.detach().float())
        object.__setattr__(self, "condition", (c / c.norm()).detach().float())
        object.__setattr__(self, "layers", layers)
        object.__setattr__(self, "vectors", torch.stack(rows).detach().float())
        object.__setattr__(self, "threshold", float(self.threshold))

    def hook_name(self, layer: int) -> str:
        return hook_name(self.hook_template, layer)

    def similarity(self, h_last: Float[Tensor, "n d_model"]) -> Float[Tensor, " n"]:
        """Cosine of each row with the condition direction (float64)."""
        return _cosine(h_last, self.condition)

    def decide(self, h_last: Float[Tensor, "n d_model"]) -> Tensor:
        """Boolean decision per row from condition-layer last-token activations."""
        sim = self.similarity(h_last)
        return sim >= self.threshold if self.comparator == "ge" else sim <= self.threshold

    @classmethod
    def fit(
        cls,
        harmful: Float[Tensor, "n d_model"],
        benign: Float[Tensor, "m d_model"],
        *,
        condition_layer: int,
        steer_layers: Sequence[int],
        steer_vectors: Float[Tensor, "layer d_model"],
        method: Literal["mean_diff", "pca"] = "mean_diff",
        grid: Sequence[float] | np.ndarray | None = None,
        hook_template: str = RESID_PRE,
        select_harmful: Float[Tensor, "p d_model"] | None = None,
        select_benign: Float[Tensor, "q d_model"] | None = None,
    ) -> Cast:
        """Condition direction from ``harmful``/``benign`` condition-layer activations, threshold
        by F1 on ``grid`` (default: 0.00, 0.01, …, 1.00 as IBM's step, plus negative values)
        over ``select_*`` activations (default: the same ones)."""
        c = condition_direction(harmful, benign, method=method)
        sh = harmful if select_harmful is None else select_harmful
        sb = benign if select_benign is None else select_benign
        g = np.round(np.arange(-1.0, 1.0001, 0.01), 2) if grid is None else grid
        theta, f1 = best_threshold_f1(_cosine(sh, c), _cosine(sb, c), g)
        return cls(
            condition_layer=condition_layer,
            condition=c,
            threshold=theta,
            steer_layers=tuple(steer_layers),
            steer_vectors=steer_vectors,
            hook_template=hook_template,
            f1=f1,
        )

    def delta(self, i: int, h: Float[Tensor, "batch pos d_model"], state: Any) -> Tensor:
        key = ("cast", id(self))
        if self.layers[i] == self.condition_layer:
            last = state.last_prompt(h)
            if last is not None:
                state.memo[key] = self.decide(last).to(torch.float32)
        if key not in state.memo:
            raise RuntimeError(
                "Cast: a steered layer ran before the condition layer decided (or a decode step "
                "came before any prefill)"
            )
        on = state.memo[key].to(h.device)
        return on.reshape(-1, 1, 1) * self.vectors[i].to(h.device)


# ---------------------------------------------------------------------------------------------
# Reports and figures


def fired(gate: CalibratedAlphaSteer | Cast, acts: Mapping[int, Tensor]) -> Tensor:
    """One bool per prompt: whether ``gate`` steers it at all, from its unsteered last-token
    activations ``{layer: [n, d]}`` (exact: a prompt's gate opens, or not, before it is
    steered)."""
    if isinstance(gate, Cast):
        return gate.decide(last_token(acts[gate.condition_layer])).cpu()
    return gate.decisions({x: acts[x] for x in gate.layers}).gt(0).any(1).cpu()


def fire_rate(gate: CalibratedAlphaSteer | Cast, acts: Mapping[int, Tensor]) -> float:
    """The share of prompts ``gate`` steers at all (see :func:`fired`)."""
    return float(fired(gate, acts).double().mean())


def held_out_false_steer(
    gate: CalibratedAlphaSteer,
    benign: Mapping[int, Tensor],
    eps: float,
    *,
    folds: int = 5,
    seed: int = 0,
) -> pd.DataFrame:
    """The realised false-steer rate on in-distribution benign prompts the threshold never saw:
    the calibration prompts (``{layer: [n, d]}``) split into ``folds`` seeded folds, τ
    calibrated on all but one at ``eps`` and the share of the held-out fold the gate opens for.
    One row per fold (``fold``, ``n_calibration``, ``n_held_out``, ``tau``,
    ``false_steer_rate``). Split conformal bounds each fold's expected rate by ``eps``
    (calibrated on ``(folds − 1)/folds`` of the prompts), so the mean is the check of the
    guarantee on the calibration distribution, without holding any prompt out of the deployed
    τ."""
    import pandas as pd

    raw = gate._raw_scores(benign)
    n = raw.shape[0]
    if not 2 <= folds <= n:
        raise ValueError(f"held_out_false_steer: folds must be in [2, {n}], got {folds}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    rows = []
    for k, held in enumerate(order.tensor_split(folds)):
        keep = torch.ones(n, dtype=torch.bool)
        keep[held] = False
        g = gate.calibrate(raw[keep], eps, too_few="ignore")
        opened = g.gate(g.gate_scores(g._scale(raw[held]))).gt(0).any(1)
        rows.append(
            {"fold": k, "n_calibration": int(keep.sum()), "n_held_out": len(held),
             "tau": g.tau[0] if g.tau else math.nan,
             "false_steer_rate": float(opened.double().mean())}
        )  # fmt: skip
    return pd.DataFrame(rows)


def gate_report(
    gate: CalibratedAlphaSteer | Cast | AlphaSteer,
    sets: Mapping[str, Mapping[int, Tensor]],
    prompts: Mapping[str, Sequence[str]] | None = None,
) -> pd.DataFrame:
    """Per-layer gate scores and decisions for cached last-token activations of several prompt
    sets (``{set name: {layer: [n, d]}}``), one row per (set, prompt, layer).

    Columns: ``set``, ``index``, ``prompt`` (if given), ``layer``, ``score`` (``h_last·w``, a
    probe's logit, or the cosine for CAST), ``gate_score`` (what is compared with τ), ``tau``,
    ``factor`` (the gate factor at that layer), ``fired`` (factor > 0), ``fired_prompt`` (the
    prompt is steered at some layer), ``first_layer`` (the first layer it fires at, −1 if none).
    Scores come from unsteered activations: exact up to each prompt's first firing layer. Plain
    AlphaSteer has τ = −inf.
    """
    import pandas as pd

    frames = []
    for name, acts in sets.items():
        if isinstance(gate, CalibratedAlphaSteer):
            layers = list(gate.layers)
            raw = gate.layer_scores(acts)
            gs = gate.gate_scores(raw)
            tau = np.array(gate.tau if gate.tau is not None else [np.nan] * len(layers))
            factor = gate.gate(gs).numpy() if gate.tau is not None else np.ones(raw.shape)
        elif isinstance(gate, AlphaSteer):
            layers = list(gate.layers)
            raw = torch.stack(
                [gate.malicious_scores(x, last_token(acts[x])).cpu() for x in layers], 1
            )
            gs = raw
            tau = np.full(len(layers), -np.inf)
            factor = np.ones(raw.shape)
        elif isinstance(gate, Cast):
            layers = [gate.condition_layer]
            h = last_token(acts[gate.condition_layer])
            raw = gate.similarity(h).cpu()[:, None]
            gs = raw
            tau = np.array([gate.threshold])
            factor = gate.decide(h).cpu().double().numpy()[:, None]
        else:
            raise ValueError(f"gate_report: unsupported steering {type(gate).__name__}")
        raw_np, gs_np = raw.numpy(), gs.numpy()
        n = raw_np.shape[0]
        order = np.argsort(layers)
        fired = factor > 0
        any_fired = fired.any(1)
        first = np.full(n, -1)
        for j in order[::-1]:
            first = np.where(fired[:, j], layers[j], first)
        texts = list(prompts[name]) if prompts is not None and name in prompts else None
        if texts is not None and len(texts) != n:
            raise ValueError(f"set {name!r}: {len(texts)} prompts for {n} activation rows")
        for j, layer in enumerate(layers):
            frame = pd.DataFrame(
                {
                    "set": name,
                    "index": np.arange(n),
                    "layer": layer,
                    "score": raw_np[:, j],
                    "gate_score": gs_np[:, j],
                    "tau": tau[j],
                    "factor": factor[:, j],
                    "fired": fired[:, j],
                    "fired_prompt": any_fired,
                    "first_layer": first,
                }
            )
            if texts is not None:
                frame.insert(2, "prompt", texts)
            frames.append(frame)
    return pd.concat(frames, ignore_index=True)


SET_COLOURS = {"benign": "#1f77b4", "harmful": "#d62728", "sensitive": "#2ca02c"}


def gate_histogram(
    report: pd.DataFrame, *, column: str = "score", nbins: int = 40, title: str | None = None
) -> go.Figure:
    """Histograms of gate scores per layer (one panel per layer, one colour per set, overlaid),
    with a dashed line at each layer's τ. Built from :func:`gate_report`."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    need = {"set", "layer", column, "tau"}
    if not need <= set(report.columns):
        raise ValueError(f"gate_histogram needs columns {sorted(need)}, got {list(report.columns)}")
    layers = sorted(report["layer"].unique())
    cols = min(len(layers), 3)
    rows = math.ceil(len(layers) / cols)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=[f"layer {x}" for x in layers])
    palette = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf"]
    sets = list(dict.fromkeys(report["set"]))
    colours = {s: SET_COLOURS.get(s, palette[i % len(palette)]) for i, s in enumerate(sets)}
    for k, layer in enumerate(layers):
        r, c = k // cols + 1, k % cols + 1
        part = report[report["layer"] == layer]
        for s in sets:
            vals = part.loc[part["set"] == s, column]
            fig.add_trace(
                go.Histogram(
                    x=vals, name=s, legendgroup=s, showlegend=k == 0, opacity=0.6,
                    nbinsx=nbins, marker_color=colours[s], histnorm="probability",
                ),
                row=r, col=c,
            )  # fmt: skip
        tau = float(part["tau"].iloc[0]) if len(part) else float("nan")
        if math.isfinite(tau):
            fig.add_vline(x=tau, line_dash="dash", line_color="black", row=r, col=c)
    fig.update_layout(
        barmode="overlay",
        title=title or f"gate {column} per layer (dashed: τ)",
        width=320 * cols + 120,
        height=280 * rows + 120,
        template="plotly_white",
    )
    return fig
