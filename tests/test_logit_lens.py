"""Vocabulary projection against the RMSNorm + unembedding formula written out by hand."""

from __future__ import annotations

import pytest
import torch

from alphasteer_lens.logit_lens import direction_logits, token_table, vocab_projection


def _norm_and_unembed(model) -> tuple[torch.Tensor, torch.Tensor, float]:  # type: ignore[no-untyped-def]
    """(γ, W_U [d, vocab], eps) read from the model's parameters."""
    if hasattr(model, "original_model"):  # TransformerBridge: the wrapped Hugging Face model
        hf = model.original_model
        return (
            hf.model.norm.weight.detach(),
            hf.lm_head.weight.detach().T,
            float(hf.config.rms_norm_eps),
        )
    return model.ln_final.w.detach(), model.W_U.detach(), float(model.cfg.eps)


def _reference(model, r: torch.Tensor) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """(γ ⊙ r / sqrt(mean(r²) + eps)) W_U."""
    gamma, w_u, eps = _norm_and_unembed(model)
    r = r.double()
    normed = gamma.double() * r / torch.sqrt((r**2).mean(-1, keepdim=True) + eps)
    return normed @ w_u.double()


def test_direction_logits_match_the_formula(any_model) -> None:  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(0)
    d = int(any_model.cfg.d_model)
    r = torch.randn(3, d, generator=g)
    got = direction_logits(any_model, r)
    torch.testing.assert_close(got.double(), _reference(any_model, r), atol=1e-4, rtol=1e-4)
    _, w_u, _ = _norm_and_unembed(any_model)
    raw = direction_logits(any_model, r, apply_norm=False)
    torch.testing.assert_close(raw.double(), r.double() @ w_u.double(), atol=1e-4, rtol=1e-4)


def test_vocab_projection_frame(tiny) -> None:  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(1)
    d = int(tiny.cfg.d_model)
    dirs = {3: torch.randn(d, generator=g), 1: torch.randn(d, generator=g)}
    df = vocab_projection(tiny, dirs, k=4)
    assert list(df.columns) == ["layer", "side", "rank", "token_id", "token", "logit"]
    assert list(df.layer.unique()) == [1, 3] and len(df) == 2 * 2 * 4
    for layer, r in dirs.items():
        ref = _reference(tiny, r[None])[0]
        top = df[(df.layer == layer) & (df.side == "top")].sort_values("rank")
        bottom = df[(df.layer == layer) & (df.side == "bottom")].sort_values("rank")
        assert list(top.token_id) == torch.topk(ref, 4).indices.tolist()
        assert list(bottom.token_id) == torch.topk(ref, 4, largest=False).indices.tolist()
        assert top.logit.is_monotonic_decreasing and bottom.logit.is_monotonic_increasing
        assert list(top.token) == [tiny.tokenizer.decode([t]) for t in top.token_id]
    # A tensor of directions (row i = layer i) and scaling a direction give the same tokens.
    stacked = vocab_projection(tiny, torch.stack([dirs[1], 5.0 * dirs[1]]), k=4)
    ids = stacked.groupby("layer").token_id.apply(list)
    assert ids[0] == ids[1] == list(df[df.layer == 1].token_id)
    table = token_table(df, "top")
    first = df[(df.layer == 3) & (df.side == "top") & (df["rank"] == 0)].token.item()
    assert table.shape == (2, 4) and table.loc[3, 0] == repr(first)


def test_vocab_projection_rejects_bad_input(tiny) -> None:  # type: ignore[no-untyped-def]
    d = int(tiny.cfg.d_model)
    with pytest.raises(ValueError, match="d_model"):
        vocab_projection(tiny, {0: torch.ones(d + 1)})
    with pytest.raises(ValueError, match="k must be"):
        vocab_projection(tiny, {0: torch.ones(d)}, k=0)
    with pytest.raises(ValueError, match="no directions"):
        vocab_projection(tiny, {})
    with pytest.raises(ValueError, match="NaN"):
        direction_logits(tiny, torch.full((1, d), float("nan")))
    with pytest.raises(ValueError, match="side"):
        token_table(vocab_projection(tiny, {0: torch.ones(d)}, k=2), "middle")
