"""Steering hooks: the right positions, once per generation, equal with and without a KV cache."""

from __future__ import annotations

import pytest
import torch

from alphasteer_lens.activations import cache_activations
from alphasteer_lens.alphasteer import AlphaSteer
from alphasteer_lens.generation import generate, generate_with_logits, next_token_logits
from alphasteer_lens.steering import ActAdd, DirectionalAblation, steer, steering_hooks

PROMPTS = ["Tell me a story about a fox.", "ok", "List three colours of the rainbow, please."]


class _Hook:
    name = "blocks.0.hook_resid_pre"


def _alphasteer(d: int, layers=(0,), seed: int = 0) -> AlphaSteer:  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(seed)
    n = len(layers)
    return AlphaSteer(
        layers=tuple(layers), w=torch.randn(n, d, generator=g), r=torch.randn(n, d, generator=g)
    )


def test_kv_cache_decode_steps_are_not_resteered() -> None:
    """Prefill (P positions) is steered; the single-position decode passes that follow are not."""
    d, P = 8, 5
    act = ActAdd((0,), torch.ones(1, d))
    ((_, fn),) = steering_hooks(act, 2.0)
    prefill = torch.zeros(2, P, d)
    out = fn(prefill, _Hook())
    assert torch.equal(out, torch.full((2, P, d), 2.0))
    for _ in range(3):
        step = torch.randn(2, 1, d)
        assert torch.equal(fn(step, _Hook()), step)


def test_no_cache_full_reruns_steer_only_prompt_positions() -> None:
    d, P = 8, 5
    ((_, fn),) = steering_hooks(ActAdd((0,), torch.ones(1, d)), 1.0)
    for n in range(P, P + 4):
        out = fn(torch.zeros(1, n, d), _Hook())
        assert torch.equal(out[0, :P], torch.ones(P, d))
        assert torch.equal(out[0, P:], torch.zeros(n - P, d))


def test_consecutive_batches_one_wider_are_separate_prefills() -> None:
    """Inside one steer(...) over several batches (as pca.py and cache_activations do), a batch
    one position wider than the last is a new prompt, not a re-run: every position is steered
    and AlphaSteer reads h_last at the new last position."""
    d, P = 8, 5
    ((_, fn),) = steering_hooks(ActAdd((0,), torch.ones(1, d)), 1.0)
    fn(torch.zeros(2, P, d), _Hook())
    other = torch.randn(2, P + 1, d, generator=torch.Generator().manual_seed(0))
    assert torch.equal(fn(other, _Hook()), other + 1.0)
    st = _alphasteer(d)
    ((_, fa),) = steering_hooks(st, 1.0)
    fa(torch.zeros(2, P, d), _Hook())
    got = fa(other, _Hook())
    coef = other[:, -1] @ st.w[0]
    assert torch.allclose(got, other + coef.reshape(-1, 1, 1) * st.r[0], atol=1e-6)


def test_generated_flag_steers_decode_steps() -> None:
    d, P = 4, 3
    ((_, fn),) = steering_hooks(ActAdd((0,), torch.ones(1, d)), 1.0, generated=True)
    fn(torch.zeros(1, P, d), _Hook())
    assert torch.equal(fn(torch.zeros(1, 1, d), _Hook()), torch.ones(1, 1, d))


def test_position_modes() -> None:
    d, P = 4, 6
    v = ActAdd((0,), torch.ones(1, d))
    ((_, last),) = steering_hooks(v, 1.0, positions="last")
    out = last(torch.zeros(1, P, d), _Hook())
    assert out[0, :, 0].tolist() == [0, 0, 0, 0, 0, 1]
    ends = torch.tensor([2, 3])
    ((_, inst),) = steering_hooks(v, 1.0, positions="instruction_end", instruction_end=ends)
    out = inst(torch.zeros(2, P, d), _Hook())
    assert out[0, :, 0].tolist() == [0, 0, 1, 1, 1, 1]
    assert out[1, :, 0].tolist() == [0, 0, 0, 1, 1, 1]


def test_alphasteer_hook_formula() -> None:
    """s = λ (h_last·w) r added at every prompt position, per row."""
    d, P = 6, 4
    st = _alphasteer(d)
    ((_, fn),) = steering_hooks(st, 0.5)
    h = torch.randn(2, P, d)
    expected = h + 0.5 * (h[:, -1] @ st.w[0]).reshape(2, 1, 1) * st.r[0]
    torch.testing.assert_close(fn(h.clone(), _Hook()), expected)


def test_per_row_strength_and_ablation() -> None:
    d = 5
    ((_, fn),) = steering_hooks(ActAdd((0,), torch.ones(1, d)), [1.0, -1.0])
    out = fn(torch.zeros(2, 3, d), _Hook())
    assert out[0].eq(1).all() and out[1].eq(-1).all()
    r = torch.randn(1, d)
    ((_, abl),) = steering_hooks(DirectionalAblation((0,), r), 1.0)
    h = torch.randn(2, 3, d)
    out = abl(h, _Hook())
    torch.testing.assert_close(out @ (r[0] / r[0].norm()), torch.zeros(2, 3), atol=1e-5, rtol=0)


@pytest.mark.parametrize("strength", [float("nan"), float("inf")])
def test_bad_strength(strength: float) -> None:
    with pytest.raises(ValueError, match="finite"):
        steering_hooks(ActAdd((0,), torch.ones(1, 4)), strength)


def test_bad_vectors() -> None:
    with pytest.raises(ValueError, match="one row per layer"):
        ActAdd((0, 1), torch.ones(1, 4))
    with pytest.raises(ValueError, match="NaN"):
        ActAdd((0,), torch.full((1, 4), float("nan")))


def test_model_checks(tiny) -> None:  # type: ignore[no-untyped-def]
    with (
        pytest.raises(ValueError, match="out of range"),
        steer(tiny, ActAdd((9,), torch.ones(1, 64))),
    ):
        pass
    with (
        pytest.raises(ValueError, match="d_model=32 but the model has d_model=64"),
        steer(tiny, ActAdd((0,), torch.ones(1, 32))),
    ):
        pass


def test_generation_same_with_and_without_kv_cache(any_model) -> None:  # type: ignore[no-untyped-def]
    d = int(any_model.cfg.d_model)
    st = _alphasteer(d, layers=(0, 1))
    kw = {"steering": st, "strength": 3.0, "max_new_tokens": 6, "progress": False}
    cached = generate(any_model, PROMPTS, use_kv_cache=True, **kw)
    uncached = generate(any_model, PROMPTS, use_kv_cache=False, **kw)
    vanilla = generate(any_model, PROMPTS, max_new_tokens=6, progress=False)
    assert cached == uncached
    assert cached != vanilla, "steering at this strength should change some continuation"


def test_prefill_logits_equal_a_separate_scoring_pass(any_model) -> None:  # type: ignore[no-untyped-def]
    """generate_with_logits reads the first-position logits from generation's own prefill (or a
    second pass where the model has no unembed hook): the same as next_token_logits, steered
    and not, and the same texts as generate(), in input order across batches."""
    d = int(any_model.cfg.d_model)
    st = _alphasteer(d, layers=(0, 1))
    prompts = [*PROMPTS, "A fourth, longer prompt about the weather in spring."]
    for kw in ({}, {"steering": st, "strength": 3.0}):
        texts, logits = generate_with_logits(
            any_model, prompts, max_new_tokens=4, batch_size=2, progress=False, **kw
        )
        assert texts == generate(
            any_model, prompts, max_new_tokens=4, batch_size=2, progress=False, **kw
        )
        ref = next_token_logits(any_model, prompts, batch_size=2, progress=False, **kw)
        assert logits is not None and logits.shape == ref.shape
        torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(ref[0], ref[1]), "rows differ, so a misordering would show"


def test_prefill_logits_cost_no_extra_forward_pass(tiny) -> None:  # type: ignore[no-untyped-def]
    calls: list[int] = []

    def count(act: torch.Tensor, hook: object) -> None:
        calls.append(act.shape[1])

    kw = {"max_new_tokens": 3, "batch_size": 2, "progress": False}
    with tiny.hooks(fwd_hooks=[("blocks.0.hook_resid_pre", count)]):
        generate(tiny, PROMPTS, **kw)
        plain = list(calls)
        calls.clear()
        generate_with_logits(tiny, PROMPTS, **kw)
    assert calls == plain


def test_steered_activations_match_formula(tiny) -> None:  # type: ignore[no-untyped-def]
    """ActAdd at layer 1 shifts resid_pre of layer 1 by exactly λ v at every prompt position."""
    v = torch.randn(1, 64)
    base = cache_activations(tiny, PROMPTS, layers=[1], progress=False)[1]
    with steer(tiny, ActAdd((1,), v), 2.0):
        steered = cache_activations(tiny, PROMPTS, layers=[1], progress=False)[1]
    torch.testing.assert_close(steered - base, (2.0 * v).expand_as(base), atol=1e-5, rtol=1e-5)
    again = cache_activations(tiny, PROMPTS, layers=[1], progress=False)[1]
    assert torch.equal(again, base), "hooks are removed when the context exits"


def test_zero_strength_is_identity(tiny) -> None:  # type: ignore[no-untyped-def]
    st = _alphasteer(64, layers=(0, 2))
    a = next_token_logits(tiny, PROMPTS, progress=False)
    b = next_token_logits(tiny, PROMPTS, steering=st, strength=0.0, progress=False)
    torch.testing.assert_close(a, b)
