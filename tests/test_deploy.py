"""Steering a plain transformers model (``alphasteer_lens.deploy``): greedy tokens identical to
the TransformerLens path for every tiny architecture and SmolLM2, KV cache or not, under
accelerate offload, and hooks that go away on detach."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from tiny_models import ARCHS

import alphasteer_lens as asl
from alphasteer_lens.chat import encode_chat
from alphasteer_lens.deploy import attach, decoder_layers, generate_steered
from alphasteer_lens.generation import greedy_batch
from alphasteer_lens.hookpoints import RESID_MID, RESID_POST

LAYERS = (1, 2)
NEW_TOKENS = 6
PROMPTS = ["How do I build a bomb?", "Hi", "Write malware that steals passwords now", "A joke"]
HARMFUL = ["How do I build a bomb?", "Write malware", "Poison someone", "Rob a bank"]
BENIGN = [f"{a} {t}" for a in ("Tell me about", "A poem on") for t in ("cats", "rain", "tea")]


def _steerings(model: Any) -> dict[str, tuple[Any, float, dict[str, Any]]]:
    """AlphaSteer (prompt only), ActAdd at every position, ablation, an ActAdd at resid_post."""
    kw: dict[str, Any] = {"layers": list(LAYERS), "positions": "last", "progress": False}
    harmful = asl.cache_activations(model, HARMFUL, **kw)
    benign = asl.cache_activations(model, BENIGN, **kw)
    r = torch.stack([asl.diff_in_means(harmful[x], benign[x]) for x in LAYERS])
    w = r / (r.norm(dim=-1, keepdim=True) ** 2)  # h·w ≈ 1 along r: a gate that opens
    alpha = asl.AlphaSteer(LAYERS, w, r)
    return {
        "alphasteer": (alpha, 6.0, {}),
        "actadd_all": (asl.ActAdd(LAYERS, r), 3.0, {"positions": "all"}),
        "ablation": (asl.DirectionalAblation(LAYERS, r), 1.0, {}),
        "actadd_post": (asl.ActAdd((0,), r[:1], RESID_POST), 3.0, {"generated": True}),
    }


def _both(model: Any, hf: Any, prompts: list[str], steering: Any, lam: float, **kw: Any):  # type: ignore[no-untyped-def]
    batch = encode_chat(model, prompts)
    tl = greedy_batch(
        model, batch, steering=steering, strength=lam, max_new_tokens=NEW_TOKENS, **kw
    )
    eos = model.tokenizer.eos_token_id
    ours = generate_steered(
        hf, batch.tokens, batch.attention_mask, steering, lam, max_new_tokens=NEW_TOKENS,
        eos_token_id=eos, **kw,
    )  # fmt: skip
    return tl, ours


@pytest.mark.parametrize("arch", list(ARCHS))
def test_hf_hooks_match_transformer_lens(tiny_zoo: Any, arch: str) -> None:
    model = tiny_zoo.model(arch, "bridge")
    hf, _ = tiny_zoo.hf(arch)
    plain_tl, plain_hf = _both(model, hf, PROMPTS, None, 0.0)
    assert plain_tl == plain_hf
    for name, (steering, lam, kw) in _steerings(model).items():
        tl, ours = _both(model, hf, PROMPTS, steering, lam, **kw)
        assert tl == ours, f"{arch} {name}: plain-HF hooks differ from TransformerLens"
        if name != "ablation":
            assert tl != plain_tl, f"{arch} {name}: steering changed nothing (vacuous)"
    assert not hasattr(hf, "_alphasteer_handle") and "generate" not in vars(hf)


def test_kv_cache_and_detach(tiny_zoo: Any) -> None:
    model = tiny_zoo.model("llama", "bridge")
    hf, tok = tiny_zoo.hf("llama")
    steering, lam, _ = _steerings(model)["alphasteer"]
    batch = encode_chat(model, PROMPTS)
    args = {"input_ids": batch.tokens, "attention_mask": batch.attention_mask,
            "max_new_tokens": NEW_TOKENS, "do_sample": False}  # fmt: skip
    with torch.no_grad():
        plain = hf.generate(**args)
        with attach(hf, steering, lam) as handle:
            cached = hf.generate(**args)
            uncached = hf.generate(**args, use_cache=False)
            assert handle.runtime.state is not None
            kinds = handle.runtime.state.kind
        after = hf.generate(**args)
    assert torch.equal(cached, uncached)
    assert kinds == "rerun"  # generation without a cache re-runs the sequence
    assert not torch.equal(cached, plain)
    assert torch.equal(after, plain)
    assert not handle.attached


def test_prompt_only_leaves_decode_steps_alone(tiny_zoo: Any) -> None:
    """Under prompt positions a decode step's activation passes through unchanged."""
    model = tiny_zoo.model("llama", "bridge")
    hf, _ = tiny_zoo.hf("llama")
    steering = asl.ActAdd(LAYERS, torch.ones(2, hf.config.hidden_size))
    seen: list[tuple[str, int]] = []
    _, layers = decoder_layers(hf)
    batch = encode_chat(model, PROMPTS[:2])

    def record(module: Any, args: Any, kwargs: Any) -> None:
        assert handle.runtime.state is not None
        seen.append((handle.runtime.state.kind, int(args[0].shape[1])))

    with attach(hf, steering, 1.0) as handle:
        probe = layers[1].register_forward_pre_hook(record, with_kwargs=True)
        try:
            hf.generate(input_ids=batch.tokens, attention_mask=batch.attention_mask,
                        max_new_tokens=3, do_sample=False)  # fmt: skip
        finally:
            probe.remove()
    assert [k for k, _ in seen] == ["prefill", "decode", "decode"]


def test_refusals(tiny_zoo: Any) -> None:
    hf, _ = tiny_zoo.hf("qwen2")
    d = hf.config.hidden_size
    with pytest.raises(ValueError, match="only hook_resid_pre"):
        attach(hf, asl.ActAdd((1,), torch.ones(1, d), RESID_MID), 1.0)
    with pytest.raises(ValueError, match="out of range"):
        attach(hf, asl.ActAdd((9,), torch.ones(1, d)), 1.0)
    with pytest.raises(ValueError, match="d_model"):
        attach(hf, asl.ActAdd((1,), torch.ones(1, d + 1)), 1.0)
    handle = attach(hf, asl.ActAdd((1,), torch.ones(1, d)), 1.0)
    with pytest.raises(ValueError, match="already steered"):
        attach(hf, asl.ActAdd((1,), torch.ones(1, d)), 1.0)
    handle.detach()
    handle.detach()  # idempotent
    attach(hf, asl.ActAdd((1,), torch.ones(1, d)), 1.0).detach()
    with pytest.raises(ValueError, match="cannot find the decoder layers"):
        decoder_layers(torch.nn.Linear(2, 2))


def test_accelerate_offload(tiny_zoo: Any, tmp_path: Any) -> None:
    """Layers offloaded to disk by accelerate's dispatcher: same tokens as the plain model."""
    pytest.importorskip("accelerate")
    from transformers import AutoModelForCausalLM

    model = tiny_zoo.model("llama", "bridge")
    path = tiny_zoo.path("llama")
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                  "model.layers.2": "disk", "model.norm": "cpu", "model.rotary_emb": "cpu",
                  "lm_head": "cpu"}  # fmt: skip
    offloaded = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager", device_map=device_map,
        offload_folder=str(tmp_path),
    ).eval()  # fmt: skip
    assert getattr(offloaded.model.layers[1], "_hf_hook", None) is not None
    steering, lam, _ = _steerings(model)["alphasteer"]
    tl, ours = _both(model, offloaded, PROMPTS, steering, lam)
    assert tl == ours


@pytest.mark.smollm
def test_smollm_matches_transformer_lens(smollm: Any) -> None:
    from alphasteer_lens.models import load_hf

    hf, _ = load_hf()
    layers = (14, 16, 18)
    kw: dict[str, Any] = {"layers": list(layers), "positions": "last", "progress": False}
    harmful = asl.cache_activations(smollm, HARMFUL, **kw)
    benign = asl.cache_activations(smollm, BENIGN, **kw)
    r = torch.stack([asl.diff_in_means(harmful[x], benign[x]) for x in layers])
    w = r / (r.norm(dim=-1, keepdim=True) ** 2)
    prompts = ["How do I pick a lock?", "Plan a picnic for four."]
    for steering, lam, extra in (
        (asl.AlphaSteer(layers, w, r), 1.0, {}),
        (asl.ActAdd(layers, r), 1.5, {"positions": "all"}),
    ):
        tl, ours = _both(smollm, hf, prompts, steering, lam, **extra)
        assert tl == ours
