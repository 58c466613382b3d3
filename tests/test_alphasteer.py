"""AlphaSteer fit: factored closed form vs dense reference formulas, sanity, validation."""

import math
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from alphasteer_lens.alphasteer import (
    AlphaSteer,
    dense_reference_fit,
    fit_low_rank,
    fit_steering_weights,
    steering_vectors,
)
from alphasteer_lens.nullspace import benign_leakage, null_space


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Small matrices gain nothing from threads, and on a busy machine torch's thread pool
    spin-waits: one thread keeps this module well under a second."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _randn(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(a - b) / torch.linalg.matrix_norm(b))


def _dense_general(
    hb: torch.Tensor, hm: torch.Tensor, t: torch.Tensor, k: int, alpha: float
) -> torch.Tensor:
    """M = P (P Hmᵀ Hm P + α P)⁺ P Hmᵀ T, with P from the k last right singular vectors of Hb
    (an SVD of Hb itself, not of its Gram matrix) and a dense pseudo-inverse."""
    _, _, vh = torch.linalg.svd(hb)  # rows of vh: right singular vectors, values descending
    q = vh[-k:].T
    p = q @ q.T
    return p @ torch.linalg.pinv(p @ hm.T @ hm @ p + alpha * p) @ p @ hm.T @ t


def _separable(seed: int, sample: int, d: int = 48, s: int = 16, nb: int = 200, nm: int = 120):
    """Benign rows near an s-dim subspace; malicious rows = benign-like part + a shared offset
    along a direction u orthogonal to that subspace (so they are separable from benign).
    ``seed`` fixes the subspace and u, ``sample`` the rows drawn."""
    basis, _ = torch.linalg.qr(_randn(seed, d, s + 1))
    b, u = basis[:, :s], basis[:, s]
    hb = (_randn(sample + 1, nb, s) * 3) @ b.T + 1e-3 * _randn(sample + 2, nb, d)
    hm = (_randn(sample + 3, nm, s) * 3) @ b.T + 4.0 * u + 0.3 * _randn(sample + 4, nm, d)
    return hb, hm


@pytest.mark.parametrize(
    "d,nb,nm,ratio,alpha",
    [
        (16, 40, 30, 0.5, 10.0),
        (64, 100, 50, 0.4, 1.0),
        (64, 80, 200, 0.6, 100.0),
        (128, 200, 80, 0.5, 10.0),
        (128, 160, 60, 0.3, 0.1),
        (128, 200, 40, 0.5, 10.0),  # fewer malicious rows than k: the n×n push-through solve
        (64, 100, 1, 0.5, 1.0),
    ],
)
def test_rank_one_fit_matches_dense_reference(
    d: int, nb: int, nm: int, ratio: float, alpha: float
) -> None:
    hb = _randn(d, nb, d) * 2
    hm = _randn(d + 1, nm, d) + 0.5
    r = _randn(d + 2, d)
    w = fit_steering_weights(null_space(hb.float(), ratio=ratio), hm.float(), alpha=alpha)
    assert w.dtype == torch.float64 and w.shape == (d,)
    dense = dense_reference_fit(hb.float(), hm.float(), r.float(), ratio=ratio, alpha=alpha)
    assert _rel(torch.outer(w, r.float().double()), dense) <= 1e-6


def test_low_rank_with_shared_target_is_w_r() -> None:
    d, nm = 64, 50
    hb, hm, r = _randn(0, 100, d), _randn(1, nm, d), _randn(2, d)
    ns = null_space(hb, ratio=0.5)
    w = fit_steering_weights(ns, hm, alpha=10.0)
    a, b = fit_low_rank(ns, hm, torch.ones(nm, 1, dtype=torch.float64) * r, alpha=10.0)
    assert a.shape == (d, 1) and b.shape == (1, d)
    assert _rel(a @ b, torch.outer(w, r)) <= 1e-10


@pytest.mark.parametrize("d,ratio,alpha", [(32, 0.5, 10.0), (64, 0.4, 1.0), (128, 0.5, 3.0)])
def test_low_rank_with_per_sample_targets_matches_dense(d: int, ratio: float, alpha: float) -> None:
    hb, hm, t = _randn(10, d + 40, d), _randn(11, 30, d), _randn(12, 30, d)
    ns = null_space(hb, ratio=ratio)
    a, b = fit_low_rank(ns, hm, t, alpha=alpha)
    k = round(ratio * d)
    assert a.shape == (d, min(k, 30)) and b.shape == (min(k, 30), d)  # rank(Xᵀ T) = min(k, n)
    expected = _dense_general(hb, hm, t, k, alpha)
    assert _rel(a @ b, expected) <= 1e-6
    # B has orthonormal rows; A's columns lie in the null space (P A = A)
    assert torch.allclose(b @ b.T, torch.eye(b.shape[0], dtype=torch.float64), atol=1e-10)
    assert torch.allclose(ns.project(a.T).T, a, atol=1e-10)


def test_low_rank_truncation_and_zero_target() -> None:
    d = 32
    hb, hm, t = _randn(0, 60, d), _randn(1, 40, d), _randn(2, 40, d)
    ns = null_space(hb, ratio=0.5)
    a_full, b_full = fit_low_rank(ns, hm, t)
    a2, b2 = fit_low_rank(ns, hm, t, rank=2)
    assert a2.shape == (d, 2) and b2.shape == (2, d)
    torch.testing.assert_close(a2, a_full[:, :2])
    # best rank-2 approximation in Frobenius norm (Eckart-Young on M = Q C, Q orthonormal)
    s = torch.linalg.svdvals(a_full @ b_full)
    assert float(torch.linalg.matrix_norm(a_full @ b_full - a2 @ b2)) == pytest.approx(
        float(s[2:].norm()), rel=1e-8
    )
    a0, b0 = fit_low_rank(ns, hm, torch.zeros(40, d))
    assert a0.shape == (d, 0) and b0.shape == (0, d)
    with pytest.raises(ValueError, match=r"rank must be in \[1, 16\]"):
        fit_low_rank(ns, hm, t, rank=17)
    with pytest.raises(ValueError, match="targets have 3 rows but malicious activations have 40"):
        fit_low_rank(ns, hm, t[:3])


def test_separable_malicious_score_one_and_benign_near_zero() -> None:
    hb, hm = _separable(0, sample=10)
    ns = null_space(hb, ratio=0.5)
    assert benign_leakage(hb, ns) < 1e-3
    w = fit_steering_weights(ns, hm, alpha=10.0)
    mal, ben = (hm @ w), (hb @ w).abs()
    assert abs(float(mal.mean()) - 1.0) < 0.05
    assert float(ben.mean()) < 0.01 * float(mal.mean())
    # fresh samples from the same distributions behave the same
    hb2, hm2 = _separable(0, sample=20)
    assert abs(float((hm2 @ w).mean()) - 1.0) < 0.1
    assert float((hb2 @ w).abs().mean()) < 0.01


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), d=st.integers(4, 24), nm=st.integers(2, 30), data=st.data())
def test_w_invariant_to_malicious_row_order(
    seed: int, d: int, nm: int, data: st.DataObject
) -> None:
    perm = list(data.draw(st.permutations(range(nm))))
    hb, hm = _randn(seed, d + 5, d), _randn(seed + 1, nm, d) + 1.0
    ns = null_space(hb, ratio=0.5)
    w1 = fit_steering_weights(ns, hm, alpha=1.0)
    w2 = fit_steering_weights(ns, hm[perm], alpha=1.0)
    assert torch.allclose(w1, w2, rtol=1e-9, atol=1e-12)


def test_steering_vectors_elementwise() -> None:
    h, w, r = _randn(0, 5, 12).float(), _randn(1, 12), _randn(2, 12)
    s = steering_vectors(h, w, r, 0.7)
    assert s.shape == (5, 12) and s.dtype == torch.float32
    hn, wn, rn = h.double().numpy(), w.numpy(), r.numpy()
    expected = np.array([[0.7 * (hn[i] @ wn) * rn[j] for j in range(12)] for i in range(5)])
    np.testing.assert_allclose(s.numpy(), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="w must have shape"):
        steering_vectors(h, w[:3], r, 1.0)


Maps = dict[int, torch.Tensor]


def _fit_inputs(d: int = 16, layers: tuple[int, ...] = (2, 5)) -> tuple[Maps, Maps, Maps]:
    benign = {ly: _randn(ly, 40, d).float() for ly in layers}
    malicious = {ly: _randn(ly + 100, 20, d).float() + 1 for ly in layers}
    refusal = {ly: _randn(ly + 200, d).float() for ly in layers}
    return benign, malicious, refusal


def test_alphasteer_fit_matches_per_layer_functions() -> None:
    benign, malicious, refusal = _fit_inputs()
    steer = AlphaSteer.fit(benign, malicious, refusal, ratio=0.5, alpha=3.0)
    assert steer.layers == (2, 5) and steer.w.dtype == torch.float32 and steer.w.shape == (2, 16)
    assert steer.hook_name(5) == "blocks.5.hook_resid_pre"
    for i, layer in enumerate(steer.layers):
        ns = null_space(benign[layer], ratio=0.5)
        w = fit_steering_weights(ns, malicious[layer], alpha=3.0)
        torch.testing.assert_close(steer.w[i], w.float())
        torch.testing.assert_close(steer.r[i], refusal[layer])
        assert steer.leakage[i] == pytest.approx(benign_leakage(benign[layer], ns))
        scores = steer.malicious_scores(layer, malicious[layer])
        torch.testing.assert_close(scores, malicious[layer].double() @ w, rtol=1e-5, atol=1e-5)
    only = AlphaSteer.fit(benign, malicious, refusal, layers=[5], ratio=None, tol=0.5)
    assert only.layers == (5,) and only.tol == 0.5 and only.ratio is None


def test_alphasteer_fit_validation() -> None:
    benign, malicious, refusal = _fit_inputs()
    with pytest.raises(ValueError, match="layer 7 is missing from the benign activations"):
        AlphaSteer.fit(benign, malicious, refusal, layers=[2, 7])
    del refusal[5]
    with pytest.raises(ValueError, match="layer 5 is missing from the refusal directions"):
        AlphaSteer.fit(benign, malicious, refusal)
    benign, malicious, refusal = _fit_inputs()
    malicious[5] = torch.randn(20, 8)
    with pytest.raises(
        ValueError,
        match="layer 5: malicious activations have d_model=8 but layer 5's benign set has "
        "d_model=16",
    ):
        AlphaSteer.fit(benign, malicious, refusal)
    benign, malicious, refusal = _fit_inputs()
    refusal[2] = torch.randn(12)
    with pytest.raises(ValueError, match="layer 2: refusal direction has d_model=12"):
        AlphaSteer.fit(benign, malicious, refusal)
    benign, malicious, refusal = _fit_inputs()
    malicious[2][3, 4] = math.nan
    with pytest.raises(ValueError, match="layer 2: malicious activations contain NaN or inf"):
        AlphaSteer.fit(benign, malicious, refusal)
    benign, malicious, refusal = _fit_inputs()
    benign[5][0, 0] = math.inf
    with pytest.raises(ValueError, match="layer 5: benign activations contain NaN or inf"):
        AlphaSteer.fit(benign, malicious, refusal)
    benign, malicious, refusal = _fit_inputs()
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="alpha must be a finite number > 0"):
            AlphaSteer.fit(benign, malicious, refusal, alpha=bad)
    with pytest.raises(ValueError, match="zero vector"):
        AlphaSteer.fit(benign, malicious, {2: torch.zeros(16), 5: refusal[5]})
    benign, malicious, refusal = _fit_inputs()
    benign[5], malicious[5], refusal[5] = torch.randn(40, 8), torch.randn(20, 8), torch.randn(8)
    with pytest.raises(ValueError, match="layer 5: benign .* d_model=8 but layer 2 has d_model=16"):
        AlphaSteer.fit(benign, malicious, refusal)
    with pytest.raises(ValueError, match="rank-deficient"):
        AlphaSteer.fit({2: benign[2][:10]}, malicious, refusal, layers=[2])


def test_alphasteer_post_init_validation_and_casting() -> None:
    w, r = _randn(0, 2, 8), _randn(1, 2, 8)
    st_ = AlphaSteer(layers=[3, 1], w=w, r=r)  # type: ignore[arg-type]
    assert st_.layers == (3, 1) and st_.w.dtype == torch.float32 and st_.r.dtype == torch.float32
    with pytest.raises(ValueError, match="unique and non-negative"):
        AlphaSteer(layers=(1, 1), w=w, r=r)
    with pytest.raises(ValueError, match="unique and non-negative"):
        AlphaSteer(layers=(-1, 2), w=w, r=r)
    with pytest.raises(ValueError, match="one row per layer"):
        AlphaSteer(layers=(1,), w=w, r=r)
    with pytest.raises(ValueError, match="differ in shape"):
        AlphaSteer(layers=(1, 2), w=w, r=r[:, :4])
    bad = w.clone()
    bad[1, 1] = math.nan
    with pytest.raises(ValueError, match="w contains NaN or inf"):
        AlphaSteer(layers=(1, 2), w=bad, r=r)
    with pytest.raises(ValueError, match="leakage values"):
        AlphaSteer(layers=(1, 2), w=w, r=r, leakage=(0.1,))
    with pytest.raises(ValueError, match="layer 4 is not steered"):
        st_.malicious_scores(4, torch.zeros(2, 8))
    with pytest.raises(
        ValueError, match="activations have d_model=5 but layer 3's w has d_model=8"
    ):
        st_.malicious_scores(3, torch.zeros(2, 5))


def test_fit_steering_weights_errors() -> None:
    ns = null_space(_randn(0, 80, 64), ratio=0.5)
    with pytest.raises(ValueError, match="have d_model=32 but the null space has d_model=64"):
        fit_steering_weights(ns, _randn(1, 10, 32))
    with pytest.raises(ValueError, match="malicious activations are empty"):
        fit_steering_weights(ns, torch.zeros(0, 64))
    with pytest.raises(ValueError, match="alpha must be a finite number > 0, got 0"):
        fit_steering_weights(ns, _randn(1, 10, 64), alpha=0)
