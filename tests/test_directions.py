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


def test_length_matched_harmless_side_removes_a_length_confound() -> None:
    """Synthetic activations = harm·e0 + length·e1 + noise. The harmless prompts are longer on
    average than the harmful ones; a plain difference in means points partly along -e1
    (length), the length-matched one almost only along e0 (harm)."""
    from alphasteer_lens.activations import Activations
    from alphasteer_lens.prompts import PromptSet

    rng = np.random.default_rng(0)
    harmful_len = rng.integers(5, 15, 200)
    benign_len = np.concatenate([rng.integers(5, 15, 300), rng.integers(40, 120, 300)])

    def acts(lens: np.ndarray, harm: float, seed: int) -> torch.Tensor:
        h = _randn(seed, len(lens), 8) * 0.1
        h[:, 0] += harm
        h[:, 1] += torch.as_tensor(lens, dtype=torch.float32) / 10
        return h

    harmful = [" ".join(["x"] * int(n)) + f" h{i}" for i, n in enumerate(harmful_len)]
    benign = PromptSet(
        "b", [" ".join(["x"] * int(n)) + f" b{i}" for i, n in enumerate(benign_len)], "test"
    )
    hb = Activations({"blocks.0.hook_resid_pre": acts(benign_len, 0.0, 1)}, "last")
    hm = acts(harmful_len, 1.0, 2)
    plain = unit(diff_in_means(hm, hb[0]))
    matched = unit(diff_in_means(hm, hb.select(benign.length_matched_indices(harmful))[0]))
    assert abs(float(plain[1])) > 0.9  # mostly length
    assert float(matched[0]) > 0.95 and abs(float(matched[1])) < 0.1  # mostly harm


def test_activations_select_rows() -> None:
    from alphasteer_lens.activations import Activations

    t = _randn(3, 5, 4)
    mask = torch.arange(10).reshape(5, 2)
    a = Activations({"blocks.2.hook_resid_pre": t}, "all", attention_mask=mask)
    b = a.select([4, 0, 0])
    assert torch.equal(b[2], t[[4, 0, 0]]) and torch.equal(b.attention_mask, mask[[4, 0, 0]])
    assert b.n == 3 and b.positions == "all" and a.n == 5 and len(a) == 1
    with pytest.raises(ValueError, match=r"indices in \[-5, 5\); bad: \[5\]"):
        a.select([1, 5])
    with pytest.raises(ValueError, match="non-empty"):
        a.select([])


def test_activations_is_a_read_only_mapping() -> None:
    """By hook name and by layer where that is unambiguous; by_layer refuses a layer with two
    hooks (it used to keep whichever came last)."""
    from collections.abc import Mapping

    import pytest

    from alphasteer_lens.activations import Activations

    pre, post = _randn(4, 3, 2), _randn(5, 3, 2)
    a = Activations({"blocks.1.hook_resid_pre": pre, "blocks.1.hook_resid_post": post}, "last")
    assert isinstance(a, Mapping) and len(a) == 2 and a.n == 3
    assert list(a) == ["blocks.1.hook_resid_pre", "blocks.1.hook_resid_post"]
    assert torch.equal(a["blocks.1.hook_resid_post"], post)
    with pytest.raises(KeyError, match="ambiguous"):
        a[1]
    with pytest.raises(ValueError, match="several cached hooks"):
        a.by_layer()
    with pytest.raises(TypeError):
        a.tensors["blocks.2.hook_resid_pre"] = pre  # type: ignore[index]
    with pytest.raises(KeyError, match="not cached"):
        a["blocks.7.hook_resid_pre"]


def test_fit_accepts_a_transformer_lens_activation_cache(tiny) -> None:  # type: ignore[no-untyped-def]
    """An ActivationCache from ``run_with_cache`` on left-padded prompts, sliced at the last
    position, fits the same AlphaSteer as cache_activations' activations."""
    from alphasteer_lens.activations import Activations, cache_activations, layer_tensors
    from alphasteer_lens.alphasteer import AlphaSteer
    from alphasteer_lens.chat import encode_chat

    benign = [f"plain request number {i} about cooking" for i in range(12)]
    harmful = [f"harmful request number {i} about weapons" for i in range(12)]
    layers = [1, 2]
    caches = []
    for ps in (benign, harmful):
        batch = encode_chat(tiny, ps)
        _, cache = tiny.run_with_cache(
            batch.tokens, attention_mask=batch.attention_mask,
            names_filter=lambda n: n.endswith("hook_resid_pre"),
        )  # fmt: skip
        caches.append(cache)
    ours = [cache_activations(tiny, ps, layers=layers, progress=False) for ps in (benign, harmful)]
    r = {layer: torch.randn(64, generator=torch.Generator().manual_seed(layer)) for layer in layers}
    kw = {"layers": layers, "ratio": 0.5, "allow_rank_deficient": True}
    a = AlphaSteer.fit(caches[0], caches[1], r, **kw)
    b = AlphaSteer.fit(ours[0], ours[1], r, **kw)
    torch.testing.assert_close(a.w, b.w, atol=1e-4, rtol=1e-3)
    assert set(layer_tensors(Activations.from_cache(caches[0]))) == {0, 1, 2, 3}
