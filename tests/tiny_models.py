"""Tiny random Hugging Face models of several architectures, built offline from configs.

Each model is saved (weights + tokenizer) to a directory, so it loads by path with
``alphasteer_lens.load_model(path)`` as a user's checkpoint would, and is also turned into a
TransformerLens 3.x ``HookedTransformer`` from the same weights where TL 3.9 supports the
architecture (HookedTransformer was removed in TL 4).

Chat models (Llama, Qwen2, Gemma2, Mistral, Phi-3) share the byte-level tokenizer with a chat
template from ``conftest.make_tokenizer``. Base models (GPT-2, GPT-NeoX/Pythia) get a byte-level
tokenizer *without* a chat template whose BOS, EOS and pad token are one ``<|endoftext|>``, as
GPT-2's and Pythia's are. Weights are drawn from N(0, 0.2), much larger than the default init, so
steering visibly changes greedy tokens.

Nothing here reaches a hub. Directory names must not contain "llama" or "gemma": TL 3.9 picks
configs by substrings of the model *path* for those families.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ENDOFTEXT = "<|endoftext|>"


@dataclass(frozen=True)
class Arch:
    """One architecture of the matrix: its Hugging Face class, whether it is a chat model (a
    tokenizer with a chat template) and whether TL 3.9's HookedTransformer can load it."""

    key: str
    hf_class: str
    chat: bool
    hooked: bool = True


ARCHS: dict[str, Arch] = {
    a.key: a
    for a in (
        Arch("llama", "LlamaForCausalLM", chat=True),
        Arch("qwen2", "Qwen2ForCausalLM", chat=True),
        Arch("gemma2", "Gemma2ForCausalLM", chat=True),
        Arch("mistral", "MistralForCausalLM", chat=True),
        Arch("phi3", "Phi3ForCausalLM", chat=True),
        Arch("gpt2", "GPT2LMHeadModel", chat=False),
        Arch("neox", "GPTNeoXForCausalLM", chat=False),
    )
}

N_LAYERS = 3
D_MODEL = 32
N_HEADS = 4


def make_base_tokenizer(directory: str | Path) -> Any:
    """A byte-level tokenizer without a chat template, GPT-2 style: one ``<|endoftext|>`` token
    is BOS, EOS and pad (GPT-2 has no pad token; users set pad = eos), padding on the right."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token=ENDOFTEXT, eos_token=ENDOFTEXT, pad_token=ENDOFTEXT
    )
    tok.padding_side = "right"
    tok.save_pretrained(directory)
    tok = AutoTokenizer.from_pretrained(directory)
    assert not getattr(tok, "chat_template", None)
    return tok


def make_chat_tokenizer(directory: str | Path) -> Any:
    """The byte-level tokenizer with a chat template from ``conftest.make_tokenizer`` (a copy
    here, so a notebook or script can use it without pytest)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<pad>"
    )
    tok.chat_template = template
    tok.save_pretrained(directory)
    tok = AutoTokenizer.from_pretrained(directory)
    tok.padding_side = "left"
    return tok


def _ids(tokenizer: Any) -> dict[str, Any]:
    return {
        "vocab_size": len(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }


def make_config(key: str, tokenizer: Any) -> Any:
    """The Hugging Face config of one tiny architecture (``N_LAYERS`` layers, ``D_MODEL`` wide)."""
    import transformers

    arch = ARCHS[key]
    d, h, layers = D_MODEL, N_HEADS, N_LAYERS
    common: dict[str, Any] = {
        **_ids(tokenizer),
        "architectures": [arch.hf_class],
        "attn_implementation": "eager",  # what the bridge runs; sdpa differs by rounding
        "tie_word_embeddings": False,
    }
    if key == "gpt2":
        return transformers.GPT2Config(
            n_embd=d,
            n_layer=layers,
            n_head=h,
            n_positions=256,
            n_ctx=256,
            **{**common, "tie_word_embeddings": True},
        )
    if key == "neox":
        return transformers.GPTNeoXConfig(
            hidden_size=d,
            num_hidden_layers=layers,
            num_attention_heads=h,
            intermediate_size=4 * d,
            max_position_embeddings=256,
            rotary_pct=0.25,
            use_parallel_residual=True,
            **common,
        )
    decoder: dict[str, Any] = {
        "hidden_size": d,
        "intermediate_size": 2 * d,
        "num_hidden_layers": layers,
        "num_attention_heads": h,
        "num_key_value_heads": h // 2,
        "max_position_embeddings": 256,
        **common,
    }
    if key == "llama":
        return transformers.LlamaConfig(**decoder)
    if key == "qwen2":
        return transformers.Qwen2Config(**decoder)
    if key == "mistral":
        return transformers.MistralConfig(sliding_window=None, **decoder)
    if key == "phi3":
        return transformers.Phi3Config(sliding_window=None, **decoder)
    if key == "gemma2":
        return transformers.Gemma2Config(
            head_dim=d // h,
            sliding_window=4096,
            query_pre_attn_scalar=d // h,
            **{**decoder, "tie_word_embeddings": True},
        )
    raise KeyError(f"unknown architecture {key!r}; known: {sorted(ARCHS)}")


def make_hf_model(key: str, tokenizer: Any, seed: int = 0) -> Any:
    """A tiny random model of architecture ``key`` in eval mode, weights drawn from N(0, 0.2)."""
    import transformers

    cfg = make_config(key, tokenizer)
    torch.manual_seed(seed)
    model = getattr(transformers, ARCHS[key].hf_class)(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.2)
    return model.eval()


def tiny_dir(root: str | Path, key: str) -> Path:
    """Where ``save_tiny`` puts architecture ``key`` under ``root``: a name without "llama" or
    "gemma", which TL 3.9 would read as an official model family."""
    return Path(root) / ("arch-" + key.replace("llama", "lm").replace("gemma", "gm"))


def save_tiny(key: str, directory: str | Path, seed: int = 0) -> Path:
    """Build architecture ``key`` and save model and tokenizer to ``directory`` (a Hugging Face
    checkpoint that ``AutoModelForCausalLM.from_pretrained`` and ``load_model`` read)."""
    directory = Path(directory)
    if (directory / "config.json").exists():
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    tok = (make_chat_tokenizer if ARCHS[key].chat else make_base_tokenizer)(directory)
    model = make_hf_model(key, tok, seed=seed)
    model.save_pretrained(directory)
    (directory / "tiny_arch.json").write_text(json.dumps({"key": key, "seed": seed}))
    return directory


def load_hf(directory: str | Path) -> tuple[Any, Any]:
    """A saved tiny model and its tokenizer, loaded as a user would (eager attention)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(directory)
    if getattr(tok, "chat_template", None):
        tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(
        directory, dtype=torch.float32, attn_implementation="eager"
    )
    return model.eval(), tok


def load_bridge(directory: str | Path) -> Any:
    """TransformerBridge of a saved tiny model, through the toolkit's own loader (by path)."""
    from alphasteer_lens.models import load_model

    return load_model(Path(directory))


def hooked_supported() -> bool:
    """Whether the installed TransformerLens still has ``HookedTransformer`` (3.x)."""
    try:
        from transformer_lens import HookedTransformer  # noqa: F401
    except ImportError:
        return False
    return True


def _gemma2_cfg(hf_cfg: Any) -> dict[str, Any]:
    """TL 3.9 picks Gemma configs by official name only ("google/gemma-2-2b" and its fixed
    sizes): take that recipe and put the tiny model's sizes in."""
    from transformer_lens import loading_from_pretrained as loading

    cfg = loading.convert_hf_model_config("google/gemma-2-2b")
    n = hf_cfg.num_hidden_layers
    cfg.update(
        d_model=hf_cfg.hidden_size,
        d_head=hf_cfg.head_dim,
        n_heads=hf_cfg.num_attention_heads,
        d_mlp=hf_cfg.intermediate_size,
        n_layers=n,
        n_ctx=hf_cfg.max_position_embeddings,
        eps=hf_cfg.rms_norm_eps,
        d_vocab=hf_cfg.vocab_size,
        n_key_value_heads=hf_cfg.num_key_value_heads,
        window_size=hf_cfg.sliding_window,
        attn_types=["local" if t == "sliding_attention" else "global" for t in hf_cfg.layer_types],
        attn_scores_soft_cap=hf_cfg.attn_logit_softcapping,
        output_logits_soft_cap=hf_cfg.final_logit_softcapping,
        rotary_base=float(hf_cfg.rope_parameters["rope_theta"]),
        tokenizer_name=None,
    )
    return cfg


def load_hooked(directory: str | Path) -> Any:
    """TL 3.9 ``HookedTransformer`` with the saved tiny model's weights, unprocessed (no LayerNorm
    folding, no centring), so its activations equal Hugging Face's ``output_hidden_states``.

    ``HookedTransformer.from_pretrained`` needs an official model name and would fetch its
    config from the hub; this does what it does from the local config instead:
    ``convert_hf_model_config`` (which reads a local directory) → ``HookedTransformerConfig`` →
    ``get_pretrained_state_dict(hf_model=...)`` → ``load_and_process_state_dict`` with every
    processing step off."""
    import pytest
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens import loading_from_pretrained as loading

    directory = Path(directory)
    key = json.loads((directory / "tiny_arch.json").read_text())["key"]
    if not ARCHS[key].hooked:
        pytest.skip(f"TL 3.9 HookedTransformer does not support {ARCHS[key].hf_class}")
    low = str(directory.resolve()).lower()
    assert "llama" not in low and "gemma" not in low, f"TL 3.9 reads names in {directory}"
    hf_model, tok = load_hf(directory)
    if key == "gemma2":
        cfg_dict = _gemma2_cfg(hf_model.config)
    else:
        cfg_dict = loading.convert_hf_model_config(str(directory))
    cfg_dict.update(
        model_name=f"tiny-{key}",
        init_weights=False,
        device="cpu",
        n_devices=1,
        dtype=torch.float32,
        d_vocab=hf_model.config.vocab_size,
    )
    cfg_dict.setdefault("default_prepend_bos", True)
    cfg = HookedTransformerConfig.from_dict(cfg_dict)
    state_dict = loading.get_pretrained_state_dict(
        str(directory), cfg, hf_model, dtype=torch.float32
    )
    padding = "left" if ARCHS[key].chat else "right"
    model = HookedTransformer(cfg, tok, move_to_device=False, default_padding_side=padding)
    model.load_and_process_state_dict(
        state_dict,
        fold_ln=False,
        center_writing_weights=False,
        center_unembed=False,
        fold_value_biases=False,
        refactor_factored_attn_matrices=False,
    )
    return model.eval()
