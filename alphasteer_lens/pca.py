"""PCA views of benign vs malicious activations, vanilla vs steered (the AlphaSteer figures).

A 2-D PCA basis is fit on the *vanilla* benign + malicious activations at one hook (last prompt
token): ``z = (h − μ) Cᵀ`` with ``μ`` the mean and ``C`` (2×d) the principal axes. Steered
activations are projected into that same basis, so the axes never move between panels.

Steered activations come in two kinds, always labelled by a ``mode`` column:

- ``"real"``: cached from the steered forward pass (``with steer(...): cache_activations(...)``).
  The cache hook is registered after the steering hooks, so at a steered hook it reads the
  activation *after* this layer's steering, and every earlier steered layer's effect has already
  flowed through the network;
- ``"on_paper"``: ``h + s(h)`` with ``s`` the vector the steering adds at this hook to the vanilla
  activation ``h``, ignoring upstream layers. Its projection is ``z(h) + s Cᵀ``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from sklearn.decomposition import PCA
from torch import Tensor

from alphasteer_lens.activations import cache_activations
from alphasteer_lens.alphasteer import AlphaSteer, steering_vectors
from alphasteer_lens.formats import PromptFormat
from alphasteer_lens.hookpoints import RESID_PRE, hook_name
from alphasteer_lens.models import HookedModel
from alphasteer_lens.nullspace import check_activations
from alphasteer_lens.steering import ActAdd, Steering, check_strength, steer

Mode = Literal["real", "on_paper"]
MODES: tuple[str, ...] = ("real", "on_paper")


@dataclass(frozen=True)
class PCABasis:
    """A PCA basis fit on vanilla activations: ``z = (h − mean) componentsᵀ`` (float64).

    ``components`` rows are sklearn's ``components_`` (unit principal axes, sklearn's sign
    convention), so :meth:`transform` equals ``PCA.transform`` on the same data.
    """

    mean: Float[Tensor, " d_model"]
    components: Float[Tensor, "n_components d_model"]
    explained_variance_ratio: tuple[float, ...]
    hook: str | None = None

    def transform(self, h: Float[Tensor, "n d_model"]) -> Float[Tensor, "n n_components"]:
        """Coordinates of activations ``h`` in this basis: ``(h − μ) Cᵀ``."""
        x = check_activations(h, "activations", self.mean.shape[0], "the PCA basis")
        return (x - self.mean) @ self.components.T

    def transform_shift(self, s: Float[Tensor, "n d_model"]) -> Float[Tensor, "n n_components"]:
        """How a shift ``s`` of the activations moves their coordinates: ``s Cᵀ`` (no mean)."""
        x = check_activations(s, "shifts", self.mean.shape[0], "the PCA basis")
        return x @ self.components.T

    def axis_title(self, i: int) -> str:
        """``"PC1 (23.4% var.)"``: an axis label with the variance this component explains."""
        return f"PC{i + 1} ({100 * self.explained_variance_ratio[i]:.1f}% var.)"


def fit_pca(
    benign: Float[Tensor, "nb d_model"],
    malicious: Float[Tensor, "nm d_model"],
    *,
    n_components: int = 2,
    hook: str | None = None,
) -> PCABasis:
    """Fit PCA (scikit-learn, exact SVD) on the stacked vanilla benign and malicious rows."""
    hb = check_activations(benign, "benign activations")
    hm = check_activations(malicious, "malicious activations", hb.shape[1], "the benign set")
    x = torch.cat([hb, hm]).numpy()
    if not 1 <= n_components <= min(x.shape):
        raise ValueError(
            f"n_components must be in [1, {min(x.shape)}] for {x.shape[0]} rows of width "
            f"{x.shape[1]}, got {n_components}"
        )
    pca = PCA(n_components=n_components, svd_solver="full").fit(x)
    return PCABasis(
        mean=torch.from_numpy(pca.mean_.copy()),
        components=torch.from_numpy(pca.components_.copy()),
        explained_variance_ratio=tuple(float(v) for v in pca.explained_variance_ratio_),
        hook=hook,
    )


def _layer_index(steering: Steering, hook: str) -> int:
    names = [steering.hook_name(layer) for layer in steering.layers]
    if hook not in names:
        raise ValueError(
            f"on-paper steering needs a steered hook: {hook!r} is not one of {names}; "
            "use mode='real' to see the effect of steering at other layers"
        )
    return names.index(hook)


def on_paper_shift(
    steering: Steering, hook: str, h: Float[Tensor, "n d_model"], strength: float
) -> Float[Tensor, "n d_model"]:
    """The vector ``s(h)`` that ``steering`` adds at ``hook`` to activations ``h`` (float64):
    AlphaSteer ``λ (h·w) r``; ActAdd ``λ v``; directional ablation ``−λ (h·r̂) r̂``."""
    lam = check_strength(strength)
    i = _layer_index(steering, hook)
    x = check_activations(h, "activations")
    if isinstance(steering, AlphaSteer):
        w, r = steering.w[i].double(), steering.r[i].double()
        return steering_vectors(x, w, r, lam)
    if isinstance(steering, ActAdd):
        return (lam * steering.vectors[i].double()).expand_as(x).clone()
    r_hat = steering.directions[i].double()
    r_hat = r_hat / r_hat.norm()
    return -lam * (x @ r_hat)[:, None] * r_hat[None, :]


def steered_activations(
    model: HookedModel,
    prompts: Sequence[str],
    steering: Steering,
    strength: float,
    *,
    hook: str,
    mode: Mode = "real",
    vanilla: Float[Tensor, "n d_model"] | None = None,
    batch_size: int = 16,
    prompt_format: PromptFormat | str | None = None,
) -> Float[Tensor, "n d_model"]:
    """Last-prompt-token activations at ``hook`` under ``steering`` at ``strength``.

    ``"real"`` runs the steered forward pass; ``"on_paper"`` returns ``vanilla + s(vanilla)``
    (``vanilla`` is cached first when not given). ``prompt_format``: as in
    :func:`~alphasteer_lens.activations.cache_activations` (None: the model's default).
    """
    kw: dict[str, Any] = {
        "batch_size": batch_size,
        "progress": False,
        "prompt_format": prompt_format,
    }
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    lam = check_strength(strength)
    if mode == "real":
        with steer(model, steering, lam):
            acts = cache_activations(model, prompts, hooks=[hook], **kw)
        return acts[hook]
    if vanilla is None:
        vanilla = cache_activations(model, prompts, hooks=[hook], **kw)[hook]
    if vanilla.shape[0] != len(prompts):
        raise ValueError(f"vanilla has {vanilla.shape[0]} rows for {len(prompts)} prompts")
    return (vanilla.double() + on_paper_shift(steering, hook, vanilla, lam)).float()


def _frame(
    z: Tensor,
    prompts: Sequence[str],
    label: str,
    condition: str,
    method: str,
    lam: float,
    mode: str,
) -> pd.DataFrame:
    arr = z.numpy()
    return pd.DataFrame(
        {
            "method": method,
            "strength": lam,
            "mode": mode,
            "label": label,
            "condition": condition,
            "index": np.arange(len(prompts)),
            "pc1": arr[:, 0],
            "pc2": arr[:, 1],
            "prompt": list(prompts),
        }
    )


def _strengths(
    steerings: Mapping[str, Steering],
    strengths: float | Sequence[float] | Mapping[str, float | Sequence[float]],
) -> dict[str, list[float]]:
    """Each method's list of λ (see :func:`pca_points`)."""

    def as_list(v: float | Sequence[float]) -> list[float]:
        return [float(v)] if isinstance(v, (int, float)) else [float(x) for x in v]

    if isinstance(strengths, Mapping):
        missing = [m for m in steerings if m not in strengths]
        if missing:
            raise ValueError(f"strengths has no λ for methods {missing}")
        out = {m: as_list(strengths[m]) for m in steerings}
    else:
        out = dict.fromkeys(steerings, as_list(strengths))
    for m, lams in out.items():
        if not lams:
            raise ValueError(f"strengths is empty for {m!r}")
    return out


def pca_points(
    model: HookedModel,
    benign: Sequence[str],
    malicious: Sequence[str],
    steerings: Mapping[str, Steering],
    strengths: float | Sequence[float] | Mapping[str, float | Sequence[float]],
    *,
    layer: int | None = None,
    hook: str | None = None,
    mode: Mode = "real",
    batch_size: int = 16,
    prompt_format: PromptFormat | str | None = None,
) -> tuple[PCABasis, pd.DataFrame]:
    """Fit the basis on vanilla activations at ``hook`` (default ``blocks.{layer}.hook_resid_pre``)
    and project vanilla and steered benign/malicious activations for every method and strength.

    Returns the basis and a long DataFrame, one row per prompt and panel, with columns
    ``method, strength, mode, label (benign|malicious), condition (vanilla|steered), index,
    pc1, pc2, prompt``. Every ``(method, strength)`` panel holds its own copy of the vanilla
    points, so one filter gives a complete panel.
    """
    if hook is not None and layer is None:
        name = hook
    elif layer is not None and hook is None:
        name = hook_name(RESID_PRE, layer)
    else:
        raise ValueError("pass exactly one of layer= or hook=")
    if not steerings:
        raise ValueError("steerings is empty: pass e.g. {'alphasteer': ..., 'actadd': ...}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    per_method = _strengths(steerings, strengths)
    sets = {"benign": list(benign), "malicious": list(malicious)}
    kw: dict[str, Any] = {"batch_size": batch_size, "prompt_format": prompt_format}
    vanilla = {
        label: cache_activations(model, ps, hooks=[name], progress=False, **kw)[name]
        for label, ps in sets.items()
    }
    basis = fit_pca(vanilla["benign"], vanilla["malicious"], hook=name)
    z_vanilla = {label: basis.transform(h) for label, h in vanilla.items()}
    frames: list[pd.DataFrame] = []
    for method, st in steerings.items():
        for lam in per_method[method]:
            for label, ps in sets.items():
                frames.append(_frame(z_vanilla[label], ps, label, "vanilla", method, lam, mode))
                if mode == "on_paper":
                    z = z_vanilla[label] + basis.transform_shift(
                        on_paper_shift(st, name, vanilla[label], lam)
                    )
                else:
                    h = steered_activations(model, ps, st, lam, hook=name, mode="real", **kw)
                    z = basis.transform(h)
                frames.append(_frame(z, ps, label, "steered", method, lam, mode))
    return basis, pd.concat(frames, ignore_index=True)


def centroid_shifts(points: pd.DataFrame) -> pd.DataFrame:
    """Per ``(method, strength, mode, label)``: how far the steered centroid moved from the
    vanilla one in the PCA plane, ``‖mean(z_steered) − mean(z_vanilla)‖``."""
    required = {"method", "strength", "mode", "label", "condition", "pc1", "pc2"}
    missing = required - set(points.columns)
    if missing:
        raise ValueError(f"points DataFrame lacks columns {sorted(missing)}")
    keys = ["method", "strength", "mode", "label"]
    means = points.groupby([*keys, "condition"], sort=True)[["pc1", "pc2"]].mean()
    wide = means.unstack("condition")
    d1 = wide[("pc1", "steered")] - wide[("pc1", "vanilla")]
    d2 = wide[("pc2", "steered")] - wide[("pc2", "vanilla")]
    out = pd.DataFrame({"shift": np.sqrt(d1**2 + d2**2)}).reset_index()
    return out
