"""AlphaSteer: null-space constrained refusal steering, fitted in closed form.

Row-vector convention, per steered layer: ``Hm`` (n×d) malicious activations, ``r`` (d) the
refusal direction (pointing toward refusal), ``Q`` (d×k) the benign null-space basis and
``P = Q Qᵀ`` (see :mod:`alphasteer_lens.nullspace`). The steering matrix solves

    min_Δ ‖Hm P Δ − T‖² + α ‖P Δ‖²,   Δ̃ = (P Hmᵀ Hm P + α P)⁺ P Hmᵀ T,   M = P Δ̃.

With ``X = Hm Q`` (n×k) this is ``M = Q (XᵀX + α I_k)⁻¹ Xᵀ T``: a k×k solve, never a dense d×d
pseudo-inverse. For the AlphaSteer target ``T = 1 rᵀ`` (every malicious row should map to ``r``)
``M = w rᵀ`` is rank one with ``w = Q (XᵀX + α I)⁻¹ Xᵀ 1``, so only ``w`` and ``r`` are stored and
the steering added to an activation ``h`` is ``h M = (h·w) r``. Benign rows lie (nearly) outside
the span of ``Q``, so for them ``h·w ≈ 0``.
"""

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from jaxtyping import Float
from torch import Tensor

from alphasteer_lens.activations import layer_tensors
from alphasteer_lens.hookpoints import RESID_PRE, check_template, hook_name
from alphasteer_lens.nullspace import NullSpace, check_activations, null_space


def _check_alpha(alpha: float) -> None:
    if not (isinstance(alpha, int | float) and math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be a finite number > 0, got {alpha}")


def _check_vector(v: Tensor, what: str, d_model: int) -> Tensor:
    if not isinstance(v, Tensor) or v.ndim != 1:
        shape = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
        raise ValueError(f"{what} must be a 1-D tensor [d_model], got {shape}")
    if v.shape[0] != d_model:
        raise ValueError(f"{what} has d_model={v.shape[0]} but expected d_model={d_model}")
    if not torch.isfinite(v).all():
        raise ValueError(f"{what} contains NaN or inf")
    return v.to(torch.float64)


def _ridge_solve(null: NullSpace, hm: Tensor, rhs: Tensor, alpha: float) -> Tensor:
    """``(XᵀX + α I_k)⁻¹ Xᵀ rhs`` with ``X = Hm Q``, by Cholesky (SPD for α > 0). With fewer
    malicious rows than null-space directions (n < k) the push-through identity
    ``(XᵀX + α I_k)⁻¹ Xᵀ = Xᵀ (XXᵀ + α I_n)⁻¹`` makes it an n×n solve instead."""
    x = hm @ null.basis.to(hm.device)
    n, k = x.shape
    eye = torch.eye(min(n, k), dtype=torch.float64, device=hm.device)
    if n < k:
        return x.T @ torch.cholesky_solve(rhs, torch.linalg.cholesky(x @ x.T + alpha * eye))
    return torch.cholesky_solve(x.T @ rhs, torch.linalg.cholesky(x.T @ x + alpha * eye))


def fit_steering_weights(
    null: NullSpace, malicious: Float[Tensor, "n d_model"], *, alpha: float = 10.0
) -> Float[Tensor, " d_model"]:
    """AlphaSteer weights ``w = Q (XᵀX + α I_k)⁻¹ Xᵀ 1`` with ``X = Hm Q`` (float64).

    ``w rᵀ`` is the minimiser ``M`` of ``‖Hm M − 1 rᵀ‖² + α ‖M‖²`` over ``M = P Δ``, so that
    ``Hm w ≈ 1`` (malicious rows get the full refusal vector) while ``w`` lies in the benign null
    space (benign rows get almost none).
    """
    _check_alpha(alpha)
    hm = check_activations(malicious, "malicious activations", null.d_model)
    ones = torch.ones(hm.shape[0], 1, dtype=torch.float64, device=hm.device)
    return null.basis.to(hm.device) @ _ridge_solve(null, hm, ones, alpha)[:, 0]


def fit_low_rank(
    null: NullSpace,
    malicious: Float[Tensor, "n d_model"],
    targets: Float[Tensor, "n d_model"],
    *,
    alpha: float = 10.0,
    rank: int | None = None,
) -> tuple[Float[Tensor, "d_model m"], Float[Tensor, "m d_model"]]:
    """General AlphaSteer fit with per-sample targets ``T``: ``M = Q C``, ``C = (XᵀX + α I)⁻¹ Xᵀ T``
    (k×d), returned factored as ``M = A B`` (float64).

    From the thin SVD ``C = U S Vᵀ``: ``A = Q U_m S_m`` (d×m), ``B = V_mᵀ`` (m×d). ``m = rank`` if
    given (1 ≤ rank ≤ min(k, d); a truncation), else the numerical rank of ``C`` (singular values
    above ``1e-10 · s_max``; 0 when ``T = 0``). ``T = 1 rᵀ`` gives m = 1 and ``A B = w rᵀ``.
    """
    _check_alpha(alpha)
    hm = check_activations(malicious, "malicious activations", null.d_model)
    t = check_activations(targets, "targets", null.d_model)
    if t.shape[0] != hm.shape[0]:
        raise ValueError(
            f"targets have {t.shape[0]} rows but malicious activations have {hm.shape[0]}"
        )
    c = _ridge_solve(null, hm, t.to(hm.device), alpha)
    u, s, vh = torch.linalg.svd(c, full_matrices=False)
    max_rank = int(s.shape[0])
    if rank is None:
        m = int((s > 1e-10 * s[0]).sum()) if float(s[0]) > 0 else 0
    elif not (1 <= rank <= max_rank):
        raise ValueError(f"rank must be in [1, {max_rank}] (min(k, d_model)), got {rank}")
    else:
        m = rank
    a = null.basis.to(hm.device) @ (u[:, :m] * s[:m])
    return a, vh[:m].contiguous()


def dense_reference_fit(
    benign: Float[Tensor, "nb d_model"],
    malicious: Float[Tensor, "nm d_model"],
    refusal: Float[Tensor, " d_model"],
    *,
    ratio: float = 0.5,
    alpha: float = 10.0,
) -> Float[Tensor, "d_model d_model"]:
    """The reference AlphaSteer formula, dense and plain, for parity tests and benchmarks:
    ``M = P (P Hmᵀ Hm P + α P)⁺ P Hmᵀ 1 rᵀ`` (d×d, float64).

    ``P = Q Qᵀ`` with ``Q`` the left singular vectors of ``G = Hbᵀ Hb`` for its ``round(ratio·d)``
    smallest singular values (``torch.linalg.svd`` of ``G``, as the reference code does) and a
    d×d ``torch.linalg.pinv``. O(d³) memory and time: do not use it to steer.
    """
    _check_alpha(alpha)
    hb = check_activations(benign, "benign activations")
    d = hb.shape[1]
    hm = check_activations(malicious, "malicious activations", d)
    r = _check_vector(refusal, "refusal direction", d)
    if not (0.0 < ratio < 1.0):
        raise ValueError(f"ratio must be in (0, 1), got {ratio}")
    k = int(round(ratio * d))
    if k < 1:
        raise ValueError(f"ratio={ratio} gives k=0 null-space directions for d_model={d}")
    gram = hb.T @ hb
    u, _, _ = torch.linalg.svd(gram)  # singular values descending: the null space is at the end
    q = u[:, d - k :]
    p = q @ q.T
    ones = torch.ones(hm.shape[0], 1, dtype=torch.float64)
    inner = p @ hm.T @ hm @ p + alpha * p
    delta = torch.linalg.pinv(inner) @ p @ hm.T @ ones @ r[None, :]
    return p @ delta


def steering_vectors(
    h_last: Float[Tensor, "batch d_model"],
    w: Float[Tensor, " d_model"],
    r: Float[Tensor, " d_model"],
    strength: float,
) -> Float[Tensor, "batch d_model"]:
    """AlphaSteer steering per prompt: ``s = λ (h_last·w) r``, in ``h_last``'s dtype and device
    (it is added to the residual stream at the hook)."""
    if h_last.ndim != 2:
        raise ValueError(f"h_last must be 2-D [batch, d_model], got shape {tuple(h_last.shape)}")
    d = h_last.shape[1]
    for name, v in (("w", w), ("r", r)):
        if v.shape != (d,):
            raise ValueError(f"{name} must have shape ({d},) to match h_last, got {tuple(v.shape)}")
    w = w.to(h_last.device, h_last.dtype)
    r = r.to(h_last.device, h_last.dtype)
    return strength * (h_last @ w)[:, None] * r[None, :]


@dataclass(frozen=True)
class AlphaSteer:
    """Fitted AlphaSteer for several layers: one ``(w, r)`` pair per layer, row ``i`` belonging
    to ``layers[i]`` and applied at ``hook_name(layers[i])``. ``w`` and ``r`` are stored float32;
    ``leakage`` is the benign leakage ``‖Hb P‖/‖Hb‖`` per layer at fit time."""

    layers: tuple[int, ...]
    w: Float[Tensor, "layer d_model"]
    r: Float[Tensor, "layer d_model"]
    hook_template: str = RESID_PRE
    alpha: float = 10.0
    ratio: float | None = 0.5
    tol: float | None = None
    leakage: tuple[float, ...] = ()
    default_positions: ClassVar[str] = "prompt"

    def __post_init__(self) -> None:
        layers = tuple(int(layer) for layer in self.layers)
        if len(set(layers)) != len(layers) or any(layer < 0 for layer in layers):
            raise ValueError(f"AlphaSteer: layers must be unique and non-negative, got {layers}")
        for name in ("w", "r"):
            v = getattr(self, name)
            if not isinstance(v, Tensor) or v.ndim != 2 or v.shape[0] != len(layers):
                shape = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
                raise ValueError(
                    f"AlphaSteer: {name} must be [n_layers, d_model] with one row per layer; got "
                    f"{shape} for {len(layers)} layers"
                )
            if not torch.isfinite(v).all():
                raise ValueError(f"AlphaSteer: {name} contains NaN or inf")
        if self.w.shape != self.r.shape:
            raise ValueError(
                f"AlphaSteer: w {tuple(self.w.shape)} and r {tuple(self.r.shape)} differ in shape"
            )
        if self.leakage and len(self.leakage) != len(layers):
            raise ValueError(
                f"AlphaSteer: {len(self.leakage)} leakage values for {len(layers)} layers"
            )
        check_template(self.hook_template)
        for name in ("w", "r"):
            if not torch.isfinite(getattr(self, name).detach().float()).all():
                raise ValueError(f"AlphaSteer: {name} overflows float32")
        object.__setattr__(self, "layers", layers)
        object.__setattr__(self, "w", self.w.detach().to(torch.float32))
        object.__setattr__(self, "r", self.r.detach().to(torch.float32))
        object.__setattr__(self, "leakage", tuple(float(x) for x in self.leakage))

    def hook_name(self, layer: int) -> str:
        """The hook point this layer's steering is applied at."""
        return hook_name(self.hook_template, layer)

    def scores(self, i: int, h_last: Float[Tensor, "batch d_model"]) -> Float[Tensor, " batch"]:
        """``h_last · w`` of ``layers[i]`` in float32: the coefficient of ``r``."""
        return h_last.float() @ self.w[i].to(h_last.device)

    def delta(self, i: int, h: Float[Tensor, "batch pos d_model"], state: Any) -> Tensor:
        """``(h_last·w) r`` for every position (the runtime applies λ and the position mask);
        ``h_last·w`` is read during the prefill and kept in ``state.memo`` for decode steps."""
        key = ("alphasteer", id(self), i)
        last = state.last_prompt(h)
        if last is not None:
            state.memo[key] = self.scores(i, last)
        elif key not in state.memo:
            raise RuntimeError("AlphaSteer: a decode step came before any prefill of its prompt")
        return state.memo[key].reshape(-1, 1, 1) * self.r[i].to(h.device)

    @classmethod
    def fit(
        cls,
        benign: Mapping[Any, Tensor],
        malicious: Mapping[Any, Tensor],
        refusal: Mapping[int, Tensor],
        *,
        layers: Sequence[int] | None = None,
        ratio: float | None = 0.5,
        tol: float | None = None,
        alpha: float = 10.0,
        hook_template: str = RESID_PRE,
        allow_rank_deficient: bool = False,
    ) -> "AlphaSteer":
        """Fit per layer: ``Q`` = :func:`null_space` of the benign activations, ``w`` =
        :func:`fit_steering_weights` on the malicious ones, ``r`` = the given refusal direction
        (taken as is, not normalised). ``layers`` defaults to the benign mapping's keys, sorted.
        Pass ``ratio=None`` to choose ``k`` by ``tol``. ``benign`` and ``malicious`` may be
        ``{layer: [n, d]}``, :class:`~alphasteer_lens.activations.Activations` or a
        TransformerLens ``ActivationCache`` of a left-padded batch (read at the last position)."""
        _check_alpha(alpha)
        benign, malicious = layer_tensors(benign), layer_tensors(malicious)
        chosen = sorted(benign) if layers is None else list(layers)
        if not chosen:
            raise ValueError("AlphaSteer.fit: no layers to fit")
        sources = (
            ("benign activations", benign),
            ("malicious activations", malicious),
            ("refusal directions", refusal),
        )
        for layer in chosen:
            for what, mapping in sources:
                if layer not in mapping:
                    raise ValueError(f"layer {layer} is missing from the {what}")
        ws: list[Tensor] = []
        rs: list[Tensor] = []
        leaks: list[float] = []
        for layer in chosen:
            hb = check_activations(benign[layer], f"layer {layer}: benign activations")
            d = hb.shape[1]
            if ws and d != ws[0].shape[0]:
                raise ValueError(
                    f"layer {layer}: benign activations have d_model={d} but layer {chosen[0]} "
                    f"has d_model={ws[0].shape[0]}"
                )
            what, against = f"layer {layer}: malicious activations", f"layer {layer}'s benign set"
            hm = check_activations(malicious[layer], what, d, against)
            r = _check_vector(refusal[layer], f"layer {layer}: refusal direction", d)
            if float(r.norm()) == 0.0:
                raise ValueError(f"layer {layer}: refusal direction is the zero vector")
            ns = null_space(hb, ratio=ratio, tol=tol, allow_rank_deficient=allow_rank_deficient)
            ws.append(fit_steering_weights(ns, hm, alpha=alpha))
            rs.append(r.to(hm.device))
            leaks.append(ns.leakage)
        return cls(
            layers=tuple(chosen),
            w=torch.stack(ws).to(torch.float32),
            r=torch.stack(rs).to(torch.float32),
            hook_template=hook_template,
            alpha=float(alpha),
            ratio=ratio,
            tol=tol,
            leakage=tuple(leaks),
        )

    def malicious_scores(self, layer: int, h: Float[Tensor, "n d_model"]) -> Float[Tensor, " n"]:
        """Scores ``h·w`` of this layer (float64): ≈ 1 for malicious rows, ≈ 0 for benign ones;
        the steering added at this layer is ``λ · score · r``."""
        if layer not in self.layers:
            raise ValueError(f"layer {layer} is not steered (layers: {list(self.layers)})")
        w = self.w[self.layers.index(layer)]
        hh = check_activations(h, "activations", w.shape[0], f"layer {layer}'s w")
        return hh @ w.to(hh.device, torch.float64)
