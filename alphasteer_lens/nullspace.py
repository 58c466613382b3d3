"""Null space of benign activations: the directions benign prompts (almost) never use.

Row-vector convention: benign activations are the rows of ``Hb`` (n×d). The uncentred Gram
matrix ``G = Hbᵀ Hb`` is eigendecomposed in float64 (``torch.linalg.eigh``); the eigenvectors of
the ``k`` smallest eigenvalues form ``Q`` (d×k, orthonormal columns) and ``P = Q Qᵀ`` projects
onto them. Anything written as ``h P`` is then (nearly) zero for benign ``h``: that is what lets
AlphaSteer steer malicious prompts and leave benign ones alone.

``k`` is chosen either by a ratio of ``d_model`` (the AlphaSteer reference uses 0.4-0.6) or by an
eigenvalue tolerance relative to the largest eigenvalue. Report :func:`benign_leakage` with
every fit: it says how much benign signal the projector lets through.
"""

import math
from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Float
from scipy.linalg.blas import dsyrk
from torch import Tensor


def check_activations(
    x: Tensor, what: str, d_model: int | None = None, against: str = "the null space"
) -> Tensor:
    """Validate an activation matrix (2-D, non-empty, finite, optional width) and return it as
    float64. ``what`` names it in error messages, e.g. ``"benign activations"``, and ``against``
    names what fixed ``d_model``."""
    if not isinstance(x, Tensor):
        raise ValueError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 2:
        raise ValueError(f"{what} must be 2-D [n, d_model], got shape {tuple(x.shape)}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{what} are empty (shape {tuple(x.shape)})")
    if not x.is_floating_point():
        x = x.to(torch.float64)
    if not torch.isfinite(x).all():
        raise ValueError(f"{what} contain NaN or inf")
    if d_model is not None and x.shape[1] != d_model:
        raise ValueError(f"{what} have d_model={x.shape[1]} but {against} has d_model={d_model}")
    return x.to(torch.float64)


@dataclass(frozen=True)
class NullSpace:
    """An orthonormal basis ``Q`` of the (approximate) null space of the benign Gram matrix.

    ``basis`` holds the eigenvectors of ``G = Hbᵀ Hb`` for the ``k`` smallest eigenvalues as
    columns (float64); ``eigenvalues`` all ``d_model`` eigenvalues of ``G``, ascending.
    """

    basis: Float[Tensor, "d_model k"]
    eigenvalues: Float[Tensor, " d_model"]

    def __post_init__(self) -> None:
        if self.basis.ndim != 2 or self.basis.shape[1] == 0:
            raise ValueError(
                f"basis must be [d_model, k] with k >= 1, got {tuple(self.basis.shape)}"
            )
        if self.eigenvalues.shape != (self.basis.shape[0],):
            raise ValueError(
                f"eigenvalues must be [d_model]={self.basis.shape[0]}, got "
                f"{tuple(self.eigenvalues.shape)}"
            )

    @property
    def k(self) -> int:
        """Dimension of the null space (number of basis columns)."""
        return int(self.basis.shape[1])

    @property
    def d_model(self) -> int:
        """Width of the residual stream the basis lives in."""
        return int(self.basis.shape[0])

    @property
    def leakage(self) -> float:
        """Benign leakage of the activations this null space was fitted on, from the eigenvalues
        alone: ``‖Hb Q‖²_F = tr(Qᵀ G Q) = Σ_{i≤k} λ_i`` and ``‖Hb‖²_F = tr G = Σ_i λ_i``, so
        ``‖Hb P‖_F / ‖Hb‖_F = sqrt(Σ_{i≤k} λ_i / Σ_i λ_i)`` (round-off negatives clamped to 0).
        For other activations use :func:`benign_leakage`."""
        lam = self.eigenvalues.clamp_min(0.0)
        total = float(lam.sum())
        if total == 0.0:
            raise ValueError("benign activations are all zero, so leakage is undefined")
        return math.sqrt(float(lam[: self.k].sum()) / total)

    def projector(self) -> Float[Tensor, "d_model d_model"]:
        """Dense projector ``P = Q Qᵀ`` (d×d, float64). For tests and diagnostics only; use
        :meth:`project` to apply it."""
        return self.basis @ self.basis.T

    def project(self, h: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
        """``h P`` for rows ``h``, computed as ``(h Q) Qᵀ`` without forming ``P`` (float64)."""
        if h.ndim == 0 or h.shape[-1] != self.d_model:
            raise ValueError(
                f"activations have shape {tuple(h.shape)} but the null space has "
                f"d_model={self.d_model}"
            )
        q = self.basis.to(h.device)
        return (h.to(torch.float64) @ q) @ q.T


def _choose_k(eigenvalues: Tensor, ratio: float | None, tol: float | None) -> int:
    d = int(eigenvalues.shape[0])
    if ratio is not None:
        k = int(round(ratio * d))
        if k < 1:
            raise ValueError(
                f"ratio={ratio} gives k={k} null-space directions for d_model={d}; k must be >= 1"
            )
    else:
        assert tol is not None
        threshold = tol * float(eigenvalues[-1])
        k = int((eigenvalues <= threshold).sum())
        if k < 1:
            raise ValueError(
                f"tol={tol} gives k=0: no eigenvalue of the benign Gram matrix is <= "
                f"tol * max eigenvalue = {threshold:.3g}; increase tol or use ratio"
            )
    if k >= d:
        what = f"ratio={ratio}" if ratio is not None else f"tol={tol}"
        raise ValueError(
            f"{what} gives k={k} = d_model: the null space would be the whole space, so benign "
            "leakage is 1.0 and the fit is vacuous; use a smaller ratio or tol (k < d_model)"
        )
    return k


def _check_ratio_tol(ratio: float | None, tol: float | None) -> None:
    if ratio is not None and tol is not None:
        raise ValueError(
            f"give either ratio or tol, not both (got ratio={ratio}, tol={tol}); "
            "pass ratio=None to choose k by tol"
        )
    if ratio is None and tol is None:
        raise ValueError("give one of ratio or tol to choose the null-space dimension k")
    if ratio is not None and not (math.isfinite(ratio) and 0.0 < ratio < 1.0):
        raise ValueError(f"ratio must be in (0, 1), got {ratio}")
    if tol is not None and not (math.isfinite(tol) and 0.0 < tol < 1.0):
        raise ValueError(f"tol must be in (0, 1), got {tol}")


def null_space(
    benign: Float[Tensor, "n d_model"],
    *,
    ratio: float | None = 0.5,
    tol: float | None = None,
    allow_rank_deficient: bool = False,
) -> NullSpace:
    """Null space of the benign activations: eigenvectors of ``G = Hbᵀ Hb`` (uncentred, float64,
    ``eigh``) for the ``k`` smallest eigenvalues.

    ``k = round(ratio · d_model)``, or, when ``tol`` is given (and ``ratio=None``), the number of
    eigenvalues ``λ_i ≤ tol · λ_max``. With fewer benign rows than ``d_model`` the Gram matrix is
    rank-deficient and its exact null space contains directions no benign prompt was seen in, so
    that is refused unless ``allow_rank_deficient=True``.
    """
    _check_ratio_tol(ratio, tol)
    hb = check_activations(benign, "benign activations")
    n, d = hb.shape
    if n < d and not allow_rank_deficient:
        raise ValueError(
            f"the Gram matrix is rank-deficient with {n} benign activations for d_model={d}, so "
            "the null space would contain directions no benign prompt was seen in; give at least "
            "d_model benign activations or pass allow_rank_deficient=True"
        )
    eigenvalues, eigenvectors = torch.linalg.eigh(gram_lower(hb), UPLO="L")
    k = _choose_k(eigenvalues, ratio, tol)
    return NullSpace(basis=eigenvectors[:, :k].contiguous(), eigenvalues=eigenvalues)


def gram_lower(hb: Float[Tensor, "n d_model"]) -> Float[Tensor, "d_model d_model"]:
    """``G = Hbᵀ Hb`` with only its lower triangle filled (all that ``eigh(..., UPLO="L")``
    reads). On the CPU this is BLAS ``dsyrk``, which computes one triangle: 1.7-3.4× faster
    than the full product here; elsewhere a plain matmul."""
    if hb.device.type != "cpu":
        return hb.T @ hb
    # A C-ordered n×d array is its transpose in Fortran order: dsyrk(trans=0) gives Hbᵀ Hb.
    g = dsyrk(1.0, np.ascontiguousarray(hb.detach().numpy()).T, trans=0, lower=1)
    return torch.from_numpy(g)


def benign_leakage(benign: Float[Tensor, "n d_model"], ns: NullSpace) -> float:
    """Benign leakage ``‖Hb P‖_F / ‖Hb‖_F`` (float64): the share of benign signal the null-space
    projector lets through. Computed as ``‖Hb Q‖_F / ‖Hb‖_F`` (equal, since ``Q`` has orthonormal
    columns). 0 means benign activations are untouched by anything routed through ``P``."""
    hb = check_activations(benign, "benign activations", ns.d_model)
    total = torch.linalg.matrix_norm(hb)
    if float(total) == 0.0:
        raise ValueError("benign activations are all zero, so leakage is undefined")
    inside = torch.linalg.matrix_norm(hb @ ns.basis.to(hb.device))
    return float(inside / total)
