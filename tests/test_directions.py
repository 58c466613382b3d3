"""Refusal directions: difference in means, refused − complied, unit vectors."""

import math

import numpy as np
import pytest
import torch

from alphasteer_lens.directions import diff_in_means, refused_minus_complied, unit


def _randn(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_diff_in_means_matches_numpy() -> None:
    harmful, harmless = _randn(0, 13, 24) + 2.0, _randn(1, 7, 24)
    r = diff_in_means(harmful, harmless)
    assert r.dtype == torch.float32 and r.shape == (24,)
    expected = harmful.double().numpy().mean(0) - harmless.double().numpy().mean(0)
    np.testing.assert_allclose(r.numpy(), expected, rtol=1e-6, atol=1e-6)
    # it points toward the harmful side: harmful rows score higher along it
    assert float((harmful @ r).mean()) > float((harmless @ r).mean())


def test_diff_in_means_errors() -> None:
    with pytest.raises(ValueError, match="harmless activations have d_model=5 but expected"):
        diff_in_means(torch.zeros(3, 4), torch.zeros(3, 5))
    with pytest.raises(ValueError, match="harmful activations are empty"):
        diff_in_means(torch.zeros(0, 4), torch.zeros(3, 4))
    with pytest.raises(ValueError, match="harmless activations contain NaN or inf"):
        diff_in_means(torch.zeros(3, 4), torch.tensor([[math.nan] * 4]))
    with pytest.raises(ValueError, match="2-D"):
        diff_in_means(torch.zeros(4), torch.zeros(3, 4))


def test_refused_minus_complied_matches_numpy() -> None:
    h = _randn(2, 10, 6)
    labels = [True, False, False, True, True, False, False, False, True, False]
    r = refused_minus_complied(h, labels)
    hn, mask = h.double().numpy(), np.array(labels)
    np.testing.assert_allclose(r.numpy(), hn[mask].mean(0) - hn[~mask].mean(0), rtol=1e-6)
    assert r.dtype == torch.float32
    torch.testing.assert_close(refused_minus_complied(h, torch.tensor(labels)), r)
    torch.testing.assert_close(refused_minus_complied(h, torch.tensor(labels).long()), r)


@pytest.mark.parametrize(
    "labels,match",
    [
        ([False] * 4, "got 0 refused and 4 complied"),
        ([True] * 4, "got 4 refused and 0 complied"),
        ([True, False], "one label per activation row"),
        (torch.tensor([0, 2, 1, 0]), "booleans"),
    ],
)
def test_refused_minus_complied_errors(labels: list[bool] | torch.Tensor, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        refused_minus_complied(_randn(3, 4, 5), labels)


def test_unit() -> None:
    v = torch.tensor([3.0, 4.0])
    u = unit(v)
    assert u.dtype == torch.float32
    torch.testing.assert_close(u, torch.tensor([0.6, 0.8]))
    rows = _randn(4, 5, 7).double()
    ur = unit(rows)
    assert ur.dtype == torch.float64
    torch.testing.assert_close(ur.norm(dim=-1), torch.ones(5, dtype=torch.float64))
    torch.testing.assert_close(ur * rows.norm(dim=-1, keepdim=True), rows)
    with pytest.raises(ValueError, match="zero vector"):
        unit(torch.zeros(4))
    with pytest.raises(ValueError, match="zero vector"):
        unit(torch.stack([torch.ones(3), torch.zeros(3)]))
    with pytest.raises(ValueError, match="NaN or inf"):
        unit(torch.tensor([1.0, math.inf]))
