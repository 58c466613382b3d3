"""Shared fixtures: a tiny random Llama (Hugging Face + TransformerBridge), a byte-level tokenizer
with a chat template, a TL 3.x HookedTransformer when that TL is installed, and the embedded
SmolLM2 for the few end-to-end tests. Nothing here reaches a hub."""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Iterator
from typing import Any

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# The toolkit's own switch stays off: the pinned PyPI wheels are fetched (once, cached) by a
# pip subprocess, the one sanctioned network path (see network_guard).
os.environ.setdefault("ALPHASTEER_LENS_OFFLINE", "0")


def _loopback(address: Any) -> bool:
    if not isinstance(address, tuple):  # AF_UNIX path
        return True
    host = str(address[0])
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False  # a host name: resolving it already meant to leave the machine


@pytest.fixture(autouse=True)
def network_guard(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Every test runs with non-loopback connections refused in this process, and fails if it
    tried one (even one whose error was caught). The PyPI wheel fetch runs ``pip download`` in a
    subprocess, which this does not patch: that is the one sanctioned network path."""
    attempts: list[str] = []
    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex
    real_create_connection = socket.create_connection

    def guard(address: Any) -> None:
        if not _loopback(address):
            attempts.append(repr(address))
            raise ConnectionRefusedError(f"network access attempted in a test: {address}")

    def connect(self: socket.socket, address: Any) -> None:
        guard(address)
        real_connect(self, address)

    def connect_ex(self: socket.socket, address: Any) -> int:
        guard(address)
        return real_connect_ex(self, address)

    def create_connection(address: Any, *args: Any, **kwargs: Any) -> socket.socket:
        guard(address)
        return real_create_connection(address, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    monkeypatch.setattr(socket, "create_connection", create_connection)
    yield attempts
    assert attempts == [], f"code tried to reach the network: {attempts}"


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


class TinyZoo:
    """Tiny random models of several architectures (``tests/tiny_models.py``), each saved once
    per session and loaded once per TransformerLens class: ``zoo.model("gpt2", "bridge")``,
    ``zoo.model("qwen2", "hooked_transformer")`` (skipped where TL has no HookedTransformer)."""

    def __init__(self, root: Any) -> None:
        self.root = root
        self._models: dict[tuple[str, str], Any] = {}

    def path(self, key: str) -> Any:
        import tiny_models

        return tiny_models.save_tiny(key, tiny_models.tiny_dir(self.root, key))

    def hf(self, key: str) -> tuple[Any, Any]:
        """A fresh Hugging Face copy (the reference: never handed to TransformerLens)."""
        import tiny_models

        return tiny_models.load_hf(self.path(key))

    def model(self, key: str, cls: str) -> Any:
        import tiny_models

        if cls == "hooked_transformer" and not tiny_models.hooked_supported():
            pytest.skip(
                "HookedTransformer exists only in TransformerLens 3.x (removed in 4.0); "
                ".ci/run's TL 3.9 leg runs this cell"
            )
        if (key, cls) not in self._models:
            path = self.path(key)
            if cls == "bridge":
                self._models[key, cls] = tiny_models.load_bridge(path)
            elif cls == "hooked_transformer":
                self._models[key, cls] = tiny_models.load_hooked(path)
            else:
                raise ValueError(f"unknown model class {cls!r}")
        return self._models[key, cls]


@pytest.fixture(scope="session")
def tiny_zoo(tmp_path_factory):  # type: ignore[no-untyped-def]
    """Tiny Llama, Qwen2, Gemma2, Mistral, Phi-3 (chat) and GPT-2, GPT-NeoX (base) models."""
    return TinyZoo(tmp_path_factory.mktemp("tiny-archs"))
