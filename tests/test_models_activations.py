"""Hooked models and activation caching, checked against Hugging Face's own forward pass."""

from __future__ import annotations

import pytest
import torch

from alphasteer_lens.activations import cache_activations, layer_of, resolve_hooks
from alphasteer_lens.chat import encode_chat, format_chat, length_batches
from alphasteer_lens.generation import generate, next_token_logits
from alphasteer_lens.models import HookedModel, kv_cache_mismatch, load_model

PROMPTS = [
    "Write a short poem about the sea.",
    "hi",
    "Explain, in two sentences, why the sky looks blue during the day.",
    "What is 12 times 7?",
]


def hf_hidden_states(hf_model, batch):  # type: ignore[no-untyped-def]
    """HF forward with the position ids HF's own generate uses for left padding."""
    pos = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = hf_model(
            input_ids=batch.tokens,
            attention_mask=batch.attention_mask,
            position_ids=pos,
            output_hidden_states=True,
        )
    return out.hidden_states


def test_bridge_satisfies_protocol(tiny) -> None:  # type: ignore[no-untyped-def]
    assert isinstance(tiny, HookedModel)


def test_left_padding_and_instruction_end(tiny) -> None:  # type: ignore[no-untyped-def]
    batch = encode_chat(tiny, PROMPTS)
    lengths = batch.attention_mask.sum(1)
    assert (batch.attention_mask[:, -1] == 1).all(), "left padding puts every last token at -1"
    assert lengths.tolist() == [
        len(tiny.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in batch.texts
    ]
    # The instruction end is the last token of the user content: decode up to it.
    for i, p in enumerate(PROMPTS):
        start = int(batch.tokens.shape[1] - lengths[i])
        upto = tiny.tokenizer.decode(batch.tokens[i, start : int(batch.instruction_end[i]) + 1])
        assert upto.endswith(p)


def test_cache_equals_hf_hidden_states(tiny, hf_tiny) -> None:  # type: ignore[no-untyped-def]
    acts = cache_activations(tiny, PROMPTS, layers=[0, 1, 3], positions="all", progress=False)
    batch = encode_chat(tiny, PROMPTS)
    hidden = hf_hidden_states(hf_tiny, batch)
    mask = batch.attention_mask.bool()
    for layer in (0, 1, 3):
        ours = acts[layer]
        width = ours.shape[1]
        assert width == mask.shape[1]
        assert torch.equal(ours[mask], hidden[layer][mask])
    assert torch.equal(acts.attention_mask, batch.attention_mask)


def test_last_mean_and_list_positions(tiny, hf_tiny) -> None:  # type: ignore[no-untyped-def]
    batch = encode_chat(tiny, PROMPTS)
    hidden = hf_hidden_states(hf_tiny, batch)[2]
    last = cache_activations(tiny, PROMPTS, layers=[2], progress=False)[2]
    assert torch.equal(last, hidden[:, -1])
    mean = cache_activations(tiny, PROMPTS, layers=[2], positions="mean", progress=False)[2]
    m = batch.attention_mask.unsqueeze(-1).float()
    torch.testing.assert_close(mean, (hidden * m).sum(1) / m.sum(1))
    two = cache_activations(tiny, PROMPTS, layers=[2], positions=[-2, 0], progress=False)[2]
    start = batch.tokens.shape[1] - batch.attention_mask.sum(1)
    assert torch.equal(two[:, 0], hidden[:, -2])
    assert torch.equal(two[:, 1], hidden[torch.arange(4), start])


def test_batching_does_not_change_activations(tiny) -> None:  # type: ignore[no-untyped-def]
    one = cache_activations(tiny, PROMPTS, layers=[3], batch_size=1, progress=False)[3]
    all_ = cache_activations(tiny, PROMPTS, layers=[3], batch_size=4, progress=False)[3]
    torch.testing.assert_close(one, all_, atol=1e-5, rtol=1e-5)


def test_caching_batches_by_padded_token_budget(tiny, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import alphasteer_lens.activations as A

    long = "a long request " * 12
    prompts = ["hi", long, "ok", long + "!", "yes", long + "?"]
    shapes: list[tuple[int, int]] = []

    def spy(model, ps, **kw):  # type: ignore[no-untyped-def]
        batch = encode_chat(model, ps, **kw)
        shapes.append(tuple(batch.tokens.shape))
        return batch

    monkeypatch.setattr(A, "encode_chat", spy)
    monkeypatch.setattr(A, "MAX_BATCH_TOKENS", 200)
    got = cache_activations(tiny, prompts, layers=[3], batch_size=8, progress=False)[3]
    longest = max(shape[1] for shape in shapes)
    assert 200 // longest < 3  # the long prompts cannot share one batch under this budget
    # every batch keeps rows × width under the budget (a lone longer row excepted), so the
    # three short prompts are never padded to a long one's width
    assert all(rows * width <= 200 or rows == 1 for rows, width in shapes), shapes
    assert sorted(rows for rows, _ in shapes) != [len(prompts)]
    one = cache_activations(tiny, prompts, layers=[3], batch_size=1, progress=False)[3]
    torch.testing.assert_close(got, one, atol=1e-5, rtol=1e-5)  # in the given order


def test_disk_cache_roundtrip_and_key(tiny, tmp_path) -> None:  # type: ignore[no-untyped-def]
    a = cache_activations(tiny, PROMPTS, layers=[1], cache=tmp_path, progress=False)
    files = list(tmp_path.glob("*.safetensors"))
    assert len(files) == 1
    b = cache_activations(tiny, PROMPTS, layers=[1], cache=tmp_path, progress=False)
    assert torch.equal(a[1], b[1])
    changed = [*PROMPTS[:-1], "What is 12 times 8?"]
    c = cache_activations(tiny, changed, layers=[1], cache=tmp_path, progress=False)
    assert len(list(tmp_path.glob("*.safetensors"))) == 2, "a changed prompt set gets a new key"
    assert not torch.equal(a[1][-1], c[1][-1])
    assert not list(tmp_path.glob(".*tmp")), "no temporary file left behind"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"layers": [4]}, "out of range"),
        ({"layers": [-1]}, "out of range"),
        ({"hooks": ["blocks.0.hook_resid_nowhere"]}, "unknown hook"),
        ({"layers": [0], "positions": "first"}, "positions must be"),
        ({"layers": [0], "positions": []}, "positions list is empty"),
        ({"layers": [0], "batch_size": 0}, "batch_size"),
    ],
)
def test_bad_requests(tiny, kwargs, message) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=message):
        cache_activations(tiny, PROMPTS, progress=False, **kwargs)


def test_bad_prompts(tiny) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match="empty"):
        cache_activations(tiny, [], layers=[0], progress=False)
    with pytest.raises(TypeError, match="prompt 1 is int"):
        cache_activations(tiny, ["ok", 3], layers=[0], progress=False)  # type: ignore[list-item]
    with pytest.raises(ValueError, match="longer than the limit"):
        encode_chat(tiny, ["word " * 400], max_tokens=100)


def test_missing_chat_template(tiny) -> None:  # type: ignore[no-untyped-def]
    class NoTemplate:
        chat_template = None

    with pytest.raises(ValueError, match="no chat template"):
        format_chat(NoTemplate(), "hello")
    assert format_chat(NoTemplate(), "hello", template="Q: {prompt}\nA:") == "Q: hello\nA:"


def test_layer_of() -> None:
    assert layer_of("blocks.12.hook_resid_pre") == 12
    with pytest.raises(ValueError, match="not inside a block"):
        layer_of("hook_embed")


def test_hooked_transformer_activations(hooked_transformer) -> None:  # type: ignore[no-untyped-def]
    """TL 3.x HookedTransformer: same hook names, and the cache equals its own run_with_cache."""
    names = resolve_hooks(hooked_transformer, [0, 2])
    acts = cache_activations(hooked_transformer, PROMPTS, layers=[0, 2], progress=False)
    batch = encode_chat(hooked_transformer, PROMPTS)
    _, ref = hooked_transformer.run_with_cache(batch.tokens, attention_mask=batch.attention_mask)
    for name in names:
        torch.testing.assert_close(acts[name], ref[name][:, -1])


def _tl_major() -> int:
    from importlib.metadata import version

    return int(version("transformer-lens").split(".")[0])


@pytest.mark.parametrize(
    "offload",
    [
        "cpu",
        pytest.param(
            "disk",
            marks=pytest.mark.skipif(
                _tl_major() < 4, reason="TL 3.9's bridge refuses disk offload targets"
            ),
        ),
    ],
)
def test_offloaded_model_matches(tiny, hf_tiny, tokenizer, tmp_path, offload) -> None:  # type: ignore[no-untyped-def]
    """The big-model path: HF load with an explicit device_map (accelerate's dispatcher; layers
    2-3 offloaded to disk on TL 4), then wrapped. Activations must match the in-memory model."""
    hf_tiny.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    device_map = {
        "model.embed_tokens": "cpu",
        "model.layers.0": "cpu",
        "model.layers.1": "cpu",
        "model.layers.2": offload,
        "model.layers.3": offload,
        "model.norm": "cpu",
        "model.rotary_emb": "cpu",
        "lm_head": "cpu",
    }
    sharded = load_model(
        tmp_path / "m",
        device_map=device_map,
        offload_folder=tmp_path / "off",
        max_memory={"cpu": "2GiB"},
    )
    a = cache_activations(sharded, PROMPTS, layers=[3], progress=False)[3]
    b = cache_activations(tiny, PROMPTS, layers=[3], progress=False)[3]
    torch.testing.assert_close(a, b)


@pytest.mark.smollm
def test_smollm_cache_equals_hf(smollm) -> None:  # type: ignore[no-untyped-def]
    from alphasteer_lens.models import load_hf

    # An unwrapped copy (the bridge wraps its HF modules in place), with eager attention.
    hf, _ = load_hf(attn_implementation="eager")
    acts = cache_activations(
        smollm, PROMPTS[:2], layers=[0, 10, 20], positions="all", progress=False
    )
    batch = encode_chat(smollm, PROMPTS[:2])
    hidden = hf_hidden_states(hf, batch)
    mask = batch.attention_mask.bool()
    for layer in (0, 10, 20):
        assert torch.equal(acts[layer][mask], hidden[layer][mask])


@pytest.mark.parametrize(
    "lengths,batch_size,budget,expected",
    [
        ([5, 1, 3, 2, 4], 2, None, [[1, 3], [2, 4], [0]]),  # shortest first, batch_size rows
        ([10, 10, 10, 100, 10], 8, 40, [[0, 1, 2, 4], [3]]),  # the long one alone, over budget
        ([3, 3, 3, 3], 8, 7, [[0, 1], [2, 3]]),  # 2 rows × 3 tokens fit in 7, 3 rows do not
        ([], 4, 16, []),
    ],
)
def test_length_batches(lengths, batch_size, budget, expected) -> None:  # type: ignore[no-untyped-def]
    got = length_batches(lengths, batch_size, budget)
    assert got == expected
    assert sorted(i for b in got for i in b) == list(range(len(lengths)))


def test_length_batches_errors() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        length_batches([1], 0)
    with pytest.raises(ValueError, match="max_batch_tokens"):
        length_batches([1], 1, 0)


def test_next_token_logits_and_greedy_tokens_equal_hf(tiny, hf_tiny) -> None:  # type: ignore[no-untyped-def]
    """Unembedding only the last position (generation.last_position_logits) changes nothing:
    next-token logits equal HF's full forward, and greedy tokens equal HF's own greedy loop."""
    batch = encode_chat(tiny, PROMPTS)
    pos = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = hf_tiny(
            input_ids=batch.tokens, attention_mask=batch.attention_mask, position_ids=pos
        ).logits[:, -1]
    ours = next_token_logits(tiny, PROMPTS, batch_size=len(PROMPTS), progress=False)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        hf_tokens = hf_tiny.generate(
            batch.tokens, attention_mask=batch.attention_mask, max_new_tokens=6, do_sample=False,
            eos_token_id=None, pad_token_id=tiny.tokenizer.pad_token_id,
        )  # fmt: skip
    eos = tiny.tokenizer.eos_token_id
    texts = generate(tiny, PROMPTS, max_new_tokens=6, batch_size=len(PROMPTS), progress=False)
    for row, text in zip(hf_tokens[:, batch.prompt_len :].tolist(), texts, strict=True):
        row = row[: row.index(eos)] if eos in row else row
        assert text == tiny.tokenizer.decode(row, skip_special_tokens=True)


def test_hooked_transformer_next_token_logits(hooked_transformer) -> None:  # type: ignore[no-untyped-def]
    """TL 3.x: the last-position slice sits at ln_final.hook_normalized; logits are unchanged."""
    batch = encode_chat(hooked_transformer, PROMPTS)
    ref = hooked_transformer(batch.tokens, attention_mask=batch.attention_mask)[:, -1]
    ours = next_token_logits(hooked_transformer, PROMPTS, batch_size=4, progress=False)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


def test_kv_cache_mismatch_names_the_broken_pairs() -> None:
    """transformers 5.24 renamed the KV cache argument; TL <= 4.3's bridge drops it."""
    assert kv_cache_mismatch("4.3.0", "5.24.0")
    assert kv_cache_mismatch("3.9.0", "5.30.1")
    assert not kv_cache_mismatch("4.3.0", "5.23.0")
    assert not kv_cache_mismatch("4.4.0", "5.24.0")
    from importlib.metadata import version

    installed = version("transformer-lens"), version("transformers")
    assert not kv_cache_mismatch(*installed), f"installed pair {installed} breaks KV caching"
