"""Steering hooks: the right positions, once per generation, equal with and without a KV cache."""

from __future__ import annotations

import pytest
import torch

from alphasteer_lens.activations import cache_activations
from alphasteer_lens.alphasteer import AlphaSteer
from alphasteer_lens.generation import generate, generate_with_logits, next_token_logits
from alphasteer_lens.steering import (
    ActAdd,
    Composition,
    DirectionalAblation,
    SteeringRuntime,
    steer,
)

PROMPTS = ["Tell me a story about a fox.", "ok", "List three colours of the rainbow, please."]


H = "blocks.0.hook_resid_pre"


def _alphasteer(d: int, layers=(0,), seed: int = 0) -> AlphaSteer:  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(seed)
    n = len(layers)
    return AlphaSteer(
        layers=tuple(layers), w=torch.randn(n, d, generator=g), r=torch.randn(n, d, generator=g)
    )


def _tokens(b: int, n: int, start: int = 10) -> torch.Tensor:
    return torch.arange(start, start + b * n).reshape(b, n)


def test_kv_cache_decode_steps_are_not_resteered() -> None:
    """Prefill (P positions) is steered; decode passes that come with a KV cache are not."""
    d, P = 8, 5
    rt = SteeringRuntime(ActAdd((0,), torch.ones(1, d)), 2.0)
    rt.begin_pass(_tokens(2, P))
    assert torch.equal(rt.apply(H, torch.zeros(2, P, d)), torch.full((2, P, d), 2.0))
    for step in range(3):
        state = rt.begin_pass(torch.tensor([[1], [2]]), cached=True)
        assert state.kind == "decode" and state.start == P + step
        x = torch.randn(2, 1, d)
        assert torch.equal(rt.apply(H, x), x)


def test_no_cache_full_reruns_steer_only_prompt_positions() -> None:
    d, P = 8, 5
    rt = SteeringRuntime(ActAdd((0,), torch.ones(1, d)), 1.0)
    seq = _tokens(1, P)
    for n in range(P, P + 4):
        state = rt.begin_pass(seq)
        assert state.kind == ("prefill" if n == P else "rerun")
        out = rt.apply(H, torch.zeros(1, n, d))
        assert torch.equal(out[0, :P], torch.ones(P, d))
        assert torch.equal(out[0, P:], torch.zeros(n - P, d))
        seq = torch.cat([seq, torch.tensor([[99]])], 1)


def test_one_token_prompt_after_a_prefill_is_a_new_prompt() -> None:
    """The old tracker took any later single-position pass for a decode step and left it
    unsteered; without a KV cache it is a new prompt, steered, and AlphaSteer reads its h_last."""
    d = 6
    rt = SteeringRuntime(ActAdd((0,), torch.ones(1, d)), 1.0)
    rt.begin_pass(_tokens(2, 4))
    rt.apply(H, torch.zeros(2, 4, d))
    assert rt.begin_pass(torch.tensor([[5], [6]])).kind == "prefill"
    assert torch.equal(rt.apply(H, torch.zeros(2, 1, d)), torch.ones(2, 1, d))
    st = _alphasteer(d)
    ra = SteeringRuntime(st, 1.0)
    ra.begin_pass(_tokens(1, 4))
    ra.apply(H, torch.randn(1, 4, d))
    ra.begin_pass(torch.tensor([[7]]))
    h = torch.randn(1, 1, d)
    expected = h + (h[:, 0] @ st.w[0]).reshape(1, 1, 1) * st.r[0]
    torch.testing.assert_close(ra.apply(H, h), expected)


def test_consecutive_batches_one_wider_are_separate_prefills() -> None:
    """Inside one steer(...) over several batches (as pca.py and cache_activations do), a batch
    one position wider than the last is a new prompt unless its tokens extend the last one."""
    d, P = 8, 5
    rt = SteeringRuntime(ActAdd((0,), torch.ones(1, d)), 1.0)
    rt.begin_pass(_tokens(2, P))
    rt.apply(H, torch.zeros(2, P, d))
    other = torch.randn(2, P + 1, d, generator=torch.Generator().manual_seed(0))
    assert rt.begin_pass(_tokens(2, P + 1, start=500)).kind == "prefill"
    assert torch.equal(rt.apply(H, other), other + 1.0)


def test_right_padding_reads_each_rows_own_last_token() -> None:
    """TransformerLens pads on the right: AlphaSteer must read h_last at each row's last real
    token (from the attention mask, or from the pad run), not at the last column."""
    d, pad = 6, 0
    st = _alphasteer(d)
    tokens = torch.tensor([[5, 6, 7, 8], [5, 6, pad, pad]])
    h = torch.randn(2, 4, d)
    end = torch.tensor([3, 1])
    coef = (h[torch.arange(2), end] @ st.w[0]).reshape(2, 1, 1)
    for kwargs in ({"pad_id": pad, "padding_side": "right"}, {}):
        rt = SteeringRuntime(st, 1.0, **kwargs)
        mask = None if kwargs else (tokens != pad).long()
        rt.begin_pass(tokens, mask)
        out = rt.apply(H, h.clone())
        steered = (torch.arange(4).unsqueeze(0) <= end.unsqueeze(1)).unsqueeze(-1)
        torch.testing.assert_close(out, h + steered * coef * st.r[0])


def test_prompt_bounds_left_pad_run_ending_in_a_bos_equal_to_pad() -> None:
    """GPT-2/Pythia: pad = BOS. The last token of a left pad run is the prepended BOS (prompt);
    without a prepended BOS the whole run is padding."""
    from alphasteer_lens.passes import prompt_bounds

    pad = 0
    tokens = torch.tensor([[0, 0, 0, 5, 6], [0, 7, 8, 9, 4], [3, 1, 2, 3, 4]])
    p = prompt_bounds(tokens, pad_id=pad, padding_side="left", bos_id=pad)
    assert p.start.tolist() == [2, 0, 0] and p.end.tolist() == [4, 4, 4]
    q = prompt_bounds(tokens, pad_id=pad, padding_side="left")
    assert q.start.tolist() == [3, 1, 0]
    r = prompt_bounds(tokens, pad_id=pad, padding_side="left", bos_id=1)  # BOS is not the pad
    assert r.start.tolist() == [3, 1, 0]


def test_generated_flag_steers_decode_steps() -> None:
    d, P = 4, 3
    rt = SteeringRuntime(ActAdd((0,), torch.ones(1, d)), 1.0, generated=True)
    rt.begin_pass(_tokens(1, P))
    rt.apply(H, torch.zeros(1, P, d))
    rt.begin_pass(torch.tensor([[3]]), cached=True)
    assert torch.equal(rt.apply(H, torch.zeros(1, 1, d)), torch.ones(1, 1, d))


def test_position_modes() -> None:
    d, P = 4, 6
    v = ActAdd((0,), torch.ones(1, d))
    rt = SteeringRuntime(v, 1.0, positions="last")
    rt.begin_pass(_tokens(1, P))
    assert rt.apply(H, torch.zeros(1, P, d))[0, :, 0].tolist() == [0, 0, 0, 0, 0, 1]
    ends = torch.tensor([2, 3])
    rt = SteeringRuntime(v, 1.0, positions="instruction_end", instruction_end=ends)
    rt.begin_pass(_tokens(2, P))
    out = rt.apply(H, torch.zeros(2, P, d))
    assert out[0, :, 0].tolist() == [0, 0, 1, 1, 1, 1]
    assert out[1, :, 0].tolist() == [0, 0, 0, 1, 1, 1]


def test_ablation_defaults_to_every_position_generated_too() -> None:
    """Arditi et al. ablate the direction at every position; the old default left generated
    tokens alone."""
    d, P = 5, 3
    r = torch.randn(1, d)
    r_hat = r[0] / r[0].norm()
    rt = SteeringRuntime(DirectionalAblation((0,), r), 1.0)
    rt.begin_pass(_tokens(2, P))
    out = rt.apply(H, torch.randn(2, P, d))
    torch.testing.assert_close(out @ r_hat, torch.zeros(2, P), atol=1e-5, rtol=0)
    rt.begin_pass(torch.tensor([[1], [2]]), cached=True)
    out = rt.apply(H, torch.randn(2, 1, d))
    torch.testing.assert_close(out @ r_hat, torch.zeros(2, 1), atol=1e-5, rtol=0)


def test_composition_parts_read_the_incoming_activation_in_any_order() -> None:
    """PyTorch chains hooks at one point, so AlphaSteer used to read h_last after ActAdd's
    addition; every part now reads the activation as it entered: the sum of the parts."""
    d, P = 6, 4
    st = _alphasteer(d)
    v = torch.randn(1, d)
    act = ActAdd((0,), v)
    h = torch.randn(2, P, d)
    outs = []
    for parts in (((st, 1.0), (act, 2.0)), ((act, 2.0), (st, 1.0))):
        rt = SteeringRuntime(Composition(parts), 0.5)
        rt.begin_pass(_tokens(2, P))
        outs.append(rt.apply(H, h.clone()))
    assert torch.equal(outs[0], outs[1])
    coef = (h[:, -1] @ st.w[0]).reshape(2, 1, 1)
    torch.testing.assert_close(outs[0], h + 0.5 * coef * st.r[0] + 0.5 * 2.0 * v[0])


def test_alphasteer_hook_formula() -> None:
    """s = λ (h_last·w) r added at every prompt position, per row."""
    d, P = 6, 4
    st = _alphasteer(d)
    rt = SteeringRuntime(st, 0.5)
    rt.begin_pass(_tokens(2, P))
    h = torch.randn(2, P, d)
    expected = h + 0.5 * (h[:, -1] @ st.w[0]).reshape(2, 1, 1) * st.r[0]
    torch.testing.assert_close(rt.apply(H, h.clone()), expected)


def test_per_row_strength_and_ablation() -> None:
    d = 5
    rt = SteeringRuntime(ActAdd((0,), torch.ones(1, d)), [1.0, -1.0])
    rt.begin_pass(_tokens(2, 3))
    out = rt.apply(H, torch.zeros(2, 3, d))
    assert out[0].eq(1).all() and out[1].eq(-1).all()


def test_arithmetic_in_float32_and_overflow_is_an_error() -> None:
    """Strength × vector beyond the activation dtype used to turn the output into inf/NaN
    ('!!!!' text) with no error."""
    d = 4
    with pytest.raises(ValueError, match="overflows float32"):
        SteeringRuntime(ActAdd((0,), torch.ones(1, d)), 1e39)
    with pytest.raises(ValueError, match="cannot be represented in torch.float32"):
        SteeringRuntime(ActAdd((0,), torch.full((1, d), 1e30)), 1e10, dtype=torch.float32)
    with pytest.raises(ValueError, match="overflow float32"):
        ActAdd((0,), torch.full((1, d), 1e39, dtype=torch.float64))
    st = _alphasteer(d)
    rt = SteeringRuntime(st, 1e30)
    rt.begin_pass(_tokens(1, 2))
    with pytest.raises(ValueError, match="overflowed torch.float32"):
        rt.apply(H, torch.full((1, 2, d), 1e10))
    # bfloat16 activations: the delta is computed in float32, then cast back
    rt = SteeringRuntime(ActAdd((0,), torch.full((1, d), 3.0)), 1.0 / 3.0)
    rt.begin_pass(_tokens(1, 2))
    out = rt.apply(H, torch.zeros(1, 2, d, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.equal(
        out, torch.ones(1, 2, d, dtype=torch.bfloat16)
    )


@pytest.mark.parametrize("strength", [float("nan"), float("inf"), True, "1"])
def test_bad_strength(strength: float) -> None:
    with pytest.raises(ValueError, match="finite|number"):
        SteeringRuntime(ActAdd((0,), torch.ones(1, 4)), strength)


def test_bad_vectors() -> None:
    with pytest.raises(ValueError, match="one row per layer"):
        ActAdd((0, 1), torch.ones(1, 4))
    with pytest.raises(ValueError, match="NaN"):
        ActAdd((0,), torch.full((1, 4), float("nan")))
    with pytest.raises(ValueError, match="hook template"):
        ActAdd((0,), torch.ones(1, 4), hook_template="blocks.{layer:>300000000}.hook_resid_pre")
    with pytest.raises(ValueError, match="hook template"):
        ActAdd((0,), torch.ones(1, 4), hook_template="blocks.3.hook_resid_pre")


def test_apply_without_a_pass_is_an_error() -> None:
    rt = SteeringRuntime(ActAdd((0,), torch.ones(1, 4)), 1.0)
    with pytest.raises(RuntimeError, match="begin_pass"):
        rt.apply(H, torch.zeros(1, 2, 4))


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


@pytest.mark.parametrize("side", ["right", "left"])
def test_steer_around_users_own_padded_forward(any_model, side) -> None:  # type: ignore[no-untyped-def]
    """TransformerLens' own tokenisation inside steer(...): each row's logits at its last real
    token equal the same prompt run alone, with right padding (read from the pad run, as
    ``model.to_tokens`` pads by default) and left padding (read from the attention mask)."""
    model = any_model
    st = _alphasteer(int(model.cfg.d_model), layers=(0, 1))
    prompts = ["a much longer prompt than the other one", "short"]
    pad = model.tokenizer.pad_token_id
    tokens = model.to_tokens(prompts, padding_side=side)
    real = tokens != pad
    last = torch.where(real, torch.arange(tokens.shape[1]), -1).max(1).values
    # Left padding needs the mask in the forward pass itself (else the pads are attended to);
    # right padding does not: causal attention never looks ahead at them.
    kw = {"attention_mask": real.long()} if side == "left" else {}
    with steer(model, st, 4.0, padding_side=side):
        batched = model(tokens, **kw)
    with steer(model, st, 4.0):
        alone = [model(model.to_tokens(p))[0, -1] for p in prompts]
    vanilla = model(tokens, **kw)
    for i in range(2):
        torch.testing.assert_close(batched[i, last[i]], alone[i], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(batched[1, last[1]], vanilla[1, last[1]], atol=1e-3)


def test_steered_generation_batched_equals_one_at_a_time(any_model) -> None:  # type: ignore[no-untyped-def]
    st = _alphasteer(int(any_model.cfg.d_model), layers=(0, 1))
    kw = {"steering": st, "strength": 3.0, "max_new_tokens": 5, "progress": False}
    batched = generate(any_model, PROMPTS, batch_size=3, **kw)
    alone = [generate(any_model, [p], **kw)[0] for p in PROMPTS]
    assert batched == alone
    assert batched != generate(any_model, PROMPTS, max_new_tokens=5, progress=False)


@pytest.mark.parametrize("use_kv_cache", [True, False])
def test_steer_around_model_generate_matches_toolkit_generate(any_model, use_kv_cache) -> None:  # type: ignore[no-untyped-def]
    """steer(...) around TransformerLens' own generate reads prefill, decode steps (KV-cache
    argument) and re-runs; the tokens equal the toolkit's generate, which tells its passes."""
    from alphasteer_lens.chat import encode_chat
    from alphasteer_lens.generation import _mask_kwargs

    model = any_model
    st = _alphasteer(int(model.cfg.d_model), layers=(0, 2))
    batch = encode_chat(model, PROMPTS)
    with steer(model, st, 3.0):
        out = model.generate(
            batch.tokens, **_mask_kwargs(model, batch), max_new_tokens=5, do_sample=False,
            stop_at_eos=False, return_type="tokens", verbose=False, use_past_kv_cache=use_kv_cache,
        )  # fmt: skip
    ours = generate(model, PROMPTS, steering=st, strength=3.0, max_new_tokens=5, progress=False)
    eos = model.tokenizer.eos_token_id
    for row, text in zip(out[:, batch.prompt_len :].tolist(), ours, strict=True):
        row = row[: row.index(eos)] if eos in row else row
        assert model.tokenizer.decode(row, skip_special_tokens=True) == text
    assert ours != generate(model, PROMPTS, max_new_tokens=5, progress=False)
