"""Null space of benign activations: projector algebra, choice of k, leakage, errors."""

import math
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from alphasteer_lens.nullspace import NullSpace, benign_leakage, gram_lower, null_space


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


def _subspace_data(seed: int, n: int, d: int, s: int, noise: float = 1e-6):
    """Rows ``Z Bᵀ + noise`` with ``B`` (d×s) orthonormal: benign data living in an s-dim space."""
    basis, _ = torch.linalg.qr(_randn(seed, d, s))
    rows = _randn(seed + 1, n, s) * 5.0 @ basis.T + noise * _randn(seed + 2, n, d)
    return rows, basis


@pytest.mark.parametrize("d,n,ratio", [(8, 20, 0.5), (32, 40, 0.25), (64, 100, 0.6)])
def test_projector_is_symmetric_idempotent_and_orthonormal(d: int, n: int, ratio: float) -> None:
    ns = null_space(_randn(d, n, d).float(), ratio=ratio)
    p = ns.projector()
    assert p.dtype == torch.float64 and ns.basis.dtype == torch.float64
    assert ns.d_model == d and ns.k == round(ratio * d)
    assert torch.allclose(p @ p, p, atol=1e-10, rtol=0)
    assert torch.allclose(p, p.T, atol=1e-10, rtol=0)
    assert torch.allclose(ns.basis.T @ ns.basis, torch.eye(ns.k, dtype=torch.float64), atol=1e-10)
    assert torch.allclose(torch.trace(p), torch.tensor(float(ns.k), dtype=torch.float64))
    h = _randn(7, 3, 5, d)
    assert torch.allclose(ns.project(h), h @ p, atol=1e-10, rtol=0)


def test_eigenvalues_and_basis_match_numpy() -> None:
    """Basis vectors are eigenvectors of G for its smallest eigenvalues (checked with numpy)."""
    hb = _randn(3, 50, 20)
    ns = null_space(hb, ratio=0.3)
    g = hb.numpy().T @ hb.numpy()
    np.testing.assert_allclose(ns.eigenvalues.numpy(), np.sort(np.linalg.eigvalsh(g)), rtol=1e-10)
    q = ns.basis.numpy()
    np.testing.assert_allclose(g @ q, q * ns.eigenvalues.numpy()[: ns.k], atol=1e-9)


def test_k_from_ratio_rounds() -> None:
    hb = _randn(0, 30, 10)
    assert null_space(hb, ratio=0.5).k == 5
    assert null_space(hb, ratio=0.26).k == 3
    assert null_space(hb, ratio=0.94).k == 9


def test_k_from_tol_counts_small_eigenvalues() -> None:
    hb, _ = _subspace_data(1, n=80, d=24, s=10)
    ns = null_space(hb, ratio=None, tol=1e-6)
    assert ns.k == 14
    ev = ns.eigenvalues
    assert ns.k == int((ev <= 1e-6 * ev.max()).sum())
    # a tolerance above all but the largest eigenvalue keeps d-1 directions
    assert null_space(_randn(2, 40, 6), ratio=None, tol=0.999).k >= 1


@pytest.mark.parametrize("k_ratio", [0.25, 0.5, 0.75])
def test_data_in_subspace_has_tiny_leakage_and_orthogonal_basis(k_ratio: float) -> None:
    d, s = 32, 8  # d - s = 24 null directions; ratio 0.75 -> k = 24
    hb, b = _subspace_data(5, n=64, d=d, s=s)
    ns = null_space(hb, ratio=k_ratio)
    assert ns.k <= d - s
    assert torch.linalg.matrix_norm(b.T @ ns.basis) < 1e-5
    assert benign_leakage(hb, ns) < 1e-5


def test_leakage_equals_eigenvalue_formula() -> None:
    """‖Hb P‖_F² = tr(Qᵀ G Q) = sum of the k smallest eigenvalues; ‖Hb‖_F² = tr G."""
    hb = _randn(4, 60, 16)
    ns = null_space(hb, ratio=0.5)
    ev = ns.eigenvalues
    expected = math.sqrt(float(ev[: ns.k].sum() / ev.sum()))
    assert benign_leakage(hb, ns) == pytest.approx(expected, rel=1e-9)
    dense = torch.linalg.matrix_norm(hb @ ns.projector()) / torch.linalg.matrix_norm(hb)
    assert benign_leakage(hb, ns) == pytest.approx(float(dense), rel=1e-9)
    assert ns.leakage == pytest.approx(float(dense), rel=1e-9)  # from the eigenvalues alone


@pytest.mark.parametrize("transposed", [False, True])
def test_gram_lower_triangle_equals_matmul(transposed: bool) -> None:
    """The syrk Gram matrix's lower triangle is ``Hbᵀ Hb``, also for a non-contiguous input."""
    hb = _randn(5, 17, 40).T if transposed else _randn(5, 40, 17)
    got = gram_lower(hb)
    full = hb.T @ hb
    assert torch.allclose(torch.tril(got), torch.tril(full), rtol=1e-12, atol=1e-12)
    assert torch.allclose(
        torch.linalg.eigvalsh(got, UPLO="L"), torch.linalg.eigvalsh(full), rtol=1e-10, atol=1e-9
    )


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    d=st.integers(4, 24),
    extra=st.integers(0, 20),
    r1=st.floats(0.05, 0.95),
    r2=st.floats(0.05, 0.95),
)
def test_leakage_is_monotone_in_k(seed: int, d: int, extra: int, r1: float, r2: float) -> None:
    lo, hi = sorted(min(r, (d - 1) / d) for r in (r1, r2))  # k = d_model is refused
    if round(lo * d) < 1:
        lo = 1 / d
    hb = _randn(seed, d + extra, d) * (1 + torch.arange(d, dtype=torch.float64))
    a, b = null_space(hb, ratio=lo), null_space(hb, ratio=max(hi, lo))
    assert a.k <= b.k
    assert benign_leakage(hb, a) <= benign_leakage(hb, b) + 1e-12


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), d=st.integers(3, 20), data=st.data())
def test_projector_invariant_to_benign_row_order(seed: int, d: int, data: st.DataObject) -> None:
    n = d + 10
    perm = data.draw(st.permutations(range(n)))
    hb = _randn(seed, n, d) * (1 + torch.arange(d, dtype=torch.float64))
    a = null_space(hb, ratio=0.5)
    b = null_space(hb[list(perm)], ratio=0.5)
    assert torch.allclose(a.eigenvalues, b.eigenvalues, rtol=1e-9, atol=1e-9)
    assert torch.allclose(a.projector(), b.projector(), atol=1e-7, rtol=0)
    assert benign_leakage(hb, a) == pytest.approx(benign_leakage(hb, b), rel=1e-7, abs=1e-12)


def test_rank_deficient_allowed_on_request() -> None:
    hb = _randn(0, 5, 12)
    ns = null_space(hb, ratio=0.5, allow_rank_deficient=True)
    assert ns.k == 6
    assert benign_leakage(hb, ns) < 1e-7  # 7 exactly-null directions: k=6 of them leak nothing


@pytest.mark.parametrize(
    "benign,kwargs,match",
    [
        (torch.zeros(0, 4), {}, "benign activations are empty"),
        (torch.zeros(4, 4, 2), {}, "must be 2-D"),
        (
            torch.ones(8, 4).index_put_((torch.tensor(1), torch.tensor(2)), torch.tensor(math.nan)),
            {},
            "benign activations contain NaN or inf",
        ),
        (torch.full((8, 4), math.inf), {}, "benign activations contain NaN or inf"),
        (torch.randn(8, 4), {"ratio": 1.5}, r"ratio must be in \(0, 1\), got 1.5"),
        (torch.randn(8, 4), {"ratio": 0.0}, r"ratio must be in \(0, 1\), got 0.0"),
        (torch.randn(8, 4), {"ratio": None, "tol": 1.0}, r"tol must be in \(0, 1\), got 1.0"),
        (torch.randn(8, 4), {"ratio": None, "tol": -1e-3}, r"tol must be in \(0, 1\)"),
        (torch.randn(8, 4), {"ratio": 0.5, "tol": 1e-3}, "either ratio or tol, not both"),
        (torch.randn(8, 4), {"ratio": None}, "give one of ratio or tol"),
        (torch.randn(8, 4), {"ratio": 0.1}, "gives k=0"),
        (torch.randn(8, 64), {}, "rank-deficient with 8 benign activations for d_model=64"),
        (torch.randn(8, 64), {}, "allow_rank_deficient=True"),
    ],
)
def test_null_space_errors(benign: torch.Tensor, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        null_space(benign, **kwargs)


def test_tol_too_small_gives_k_zero_error() -> None:
    scale = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    hb = torch.eye(4, dtype=torch.float64).repeat(3, 1) * scale  # eigenvalues 3, 12, 27, 48
    torch.testing.assert_close(
        null_space(hb, ratio=None, tol=0.5).eigenvalues,
        torch.tensor([3.0, 12.0, 27.0, 48.0], dtype=torch.float64),
    )
    assert null_space(hb, ratio=None, tol=0.5).k == 2
    with pytest.raises(ValueError, match="tol=0.01 gives k=0"):
        null_space(hb, ratio=None, tol=0.01)


def test_k_equal_to_d_model_is_refused() -> None:
    """Defect 10: a ratio rounding to k = d_model used to be accepted (leakage reported 1.0)."""
    hb = _randn(0, 30, 10)
    assert null_space(hb, ratio=0.94).k == 9
    with pytest.raises(ValueError, match=r"ratio=0.96 gives k=10 = d_model.*vacuous"):
        null_space(hb, ratio=0.96)
    with pytest.raises(ValueError, match=r"tol=0.5 gives k=4 = d_model"):  # all eigenvalues 0
        null_space(torch.zeros(8, 4), ratio=None, tol=0.5)


def test_leakage_and_project_errors() -> None:
    ns = null_space(_randn(0, 80, 64), ratio=0.5)
    with pytest.raises(ValueError, match="have d_model=32 but the null space has d_model=64"):
        benign_leakage(_randn(1, 40, 32), ns)
    with pytest.raises(ValueError, match="all zero"):
        benign_leakage(torch.zeros(3, 64), ns)
    with pytest.raises(ValueError, match="d_model=64"):
        ns.project(torch.zeros(3, 32))
    with pytest.raises(ValueError, match="k >= 1"):
        NullSpace(basis=torch.zeros(4, 0), eigenvalues=torch.zeros(4))
    with pytest.raises(ValueError, match="eigenvalues"):
        NullSpace(basis=torch.zeros(4, 2), eigenvalues=torch.zeros(3))
