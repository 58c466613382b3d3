"""Benign steering vectors: contrastive construction on the tiny model, and loading user vectors
from safetensors and GGUF control vectors (round trips and clear errors)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from alphasteer_lens.activations import cache_activations
from alphasteer_lens.artifacts import save_steering
from alphasteer_lens.benign_vectors import (
    COMPLY_PREFIX,
    JSON_SUFFIX,
    REFUSE_PREFIX,
    compliance_vector,
    json_vector,
    load_vector,
    paired_direction,
    vector_from_tensors,
)
from alphasteer_lens.steering import ActAdd

PROMPTS = ["Name a colour.", "Write a haiku about rain.", "What is 2+2?", "List three fruits."]


def write_gguf(path, directions: dict[int, np.ndarray], arch: str = "controlvector") -> None:  # type: ignore[no-untyped-def]
    from gguf import GGUFWriter

    writer = GGUFWriter(path, arch)
    writer.add_string("controlvector.model_hint", "llama")
    writer.add_uint32("controlvector.layer_count", len(directions))
    for layer, v in directions.items():
        writer.add_tensor(f"direction.{layer}", v.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_paired_direction_mean_and_pca() -> None:
    g = torch.Generator().manual_seed(0)
    pos, neg = torch.randn(20, 8, generator=g), torch.randn(20, 8, generator=g)
    assert torch.allclose(paired_direction(pos, neg, "mean"), pos.mean(0) - neg.mean(0), atol=1e-6)
    # differences along one axis (plus small noise): the first PC is that axis, signed and scaled
    # like the mean difference
    axis = torch.zeros(8)
    axis[3] = 1.0
    scale = torch.linspace(1.0, 3.0, 20)[:, None]
    diffs = scale * axis + 1e-3 * torch.randn(20, 8, generator=g)
    pc = paired_direction(neg + diffs, neg, "pca")
    mean = diffs.double().mean(0)
    assert pc.argmax() == 3
    assert float(pc[3]) == pytest.approx(float(mean[3]), rel=1e-2)
    with pytest.raises(ValueError, match="one shape"):
        paired_direction(pos, neg[:3], "mean")
    with pytest.raises(ValueError, match="method"):
        paired_direction(pos, neg, "median")  # type: ignore[arg-type]


def test_compliance_vector_is_diff_of_reply_means(tiny) -> None:  # type: ignore[no-untyped-def]
    layers = (1, 2)
    v = compliance_vector(tiny, PROMPTS, layers)
    assert v.layers == layers and v.hook_template == "blocks.{layer}.hook_resid_pre"
    # byte-level tokenizer: one token per byte of the prefix
    k_c, k_r = len(COMPLY_PREFIX.encode()), len(REFUSE_PREFIX.encode())
    comply = cache_activations(tiny, PROMPTS, layers=layers, positions="all",
                               assistant_prefix=COMPLY_PREFIX, progress=False)  # fmt: skip
    refuse = cache_activations(tiny, PROMPTS, layers=layers, positions="all",
                               assistant_prefix=REFUSE_PREFIX, progress=False)  # fmt: skip
    for i, layer in enumerate(layers):
        expected = comply[layer][:, -k_c:].mean(1).mean(0) - refuse[layer][:, -k_r:].mean(1).mean(0)
        assert torch.allclose(v.vectors[i], expected, atol=1e-4)


def test_json_vector_is_last_token_diff(tiny) -> None:  # type: ignore[no-untyped-def]
    v = json_vector(tiny, PROMPTS, [0, 3])
    asked = cache_activations(tiny, [p + JSON_SUFFIX for p in PROMPTS], layers=[3], progress=False)
    plain = cache_activations(tiny, PROMPTS, layers=[3], progress=False)
    assert torch.allclose(v.vectors[1], asked[3].mean(0) - plain[3].mean(0), atol=1e-5)
    # layer 0 at the last token sees the same template token for every prompt
    assert torch.allclose(v.vectors[0], torch.zeros(64), atol=1e-6)
    with pytest.raises(ValueError, match="layers"):
        json_vector(tiny, PROMPTS, [7])


def test_safetensors_round_trip_and_names(tmp_path, tiny) -> None:  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(1)
    rows = {layer: torch.randn(64, generator=g) for layer in (1, 3)}
    path = tmp_path / "v.safetensors"
    save_file({f"blocks.{k}.hook_resid_pre": t for k, t in rows.items()}, str(path))
    v = load_vector(path, model=tiny)
    assert v.layers == (1, 3) and v.hook_template == "blocks.{layer}.hook_resid_pre"
    assert torch.equal(v.vectors, torch.stack([rows[1], rows[3]]))
    assert load_vector(path, layers=[3]).layers == (3,)
    save_file({f"direction.{k}": t for k, t in rows.items()}, str(path))
    assert load_vector(path).hook_template == "blocks.{layer}.hook_resid_post"
    # an alphasteer_lens artifact (content hash checked) loads too
    art = save_steering(ActAdd((2,), rows[1][None]), tmp_path / "a.safetensors", model=tiny)
    assert torch.equal(load_vector(art, model=tiny).vectors, rows[1][None])


@pytest.mark.parametrize(
    ("tensors", "kw", "match"),
    [
        ({"blocks.1.hook_resid_pre": torch.randn(32)}, {"d_model": 64}, "d_model=32"),
        ({"blocks.1.hook_resid_pre": torch.tensor([1.0, float("nan")])}, {}, "NaN"),
        ({"blocks.1.hook_resid_pre": torch.randn(64)}, {"layers": [1, 2]}, r"layers \[2\]"),
        ({"blocks.9.hook_resid_pre": torch.randn(64)}, {"n_layers": 4}, "out of range"),
        ({"layer1": torch.randn(64)}, {}, "unexpected tensor 'layer1'"),
        ({"blocks.1.hook_resid_pre": torch.randn(2, 64)}, {}, "1-D float"),
        ({"blocks.1.hook_resid_pre": torch.randn(64), "direction.2": torch.randn(64)}, {}, "mixes"),
        ({}, {}, "no steering tensors"),
    ],
)
def test_vector_from_tensors_errors(tensors, kw, match) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=match):
        vector_from_tensors(tensors, **kw)


def test_safetensors_file_errors(tmp_path, tiny) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "v.safetensors"
    save_file({"blocks.1.hook_resid_pre": torch.randn(32)}, str(path))
    with pytest.raises(ValueError, match="d_model=32 but the model has 64"):
        load_vector(path, model=tiny)
    save_file({"blocks.1.hook_resid_pre": torch.full((64,), float("inf"))}, str(path))
    with pytest.raises(ValueError, match="NaN or inf"):
        load_vector(path)
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        load_vector(path)
    with pytest.raises(FileNotFoundError):
        load_vector(tmp_path / "missing.gguf")


def test_gguf_control_vector_round_trip(tmp_path, tiny) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(0)
    directions = {1: rng.standard_normal(64), 2: rng.standard_normal(64)}
    path = tmp_path / "cv.gguf"
    write_gguf(path, directions)
    v = load_vector(path, model=tiny)
    assert v.layers == (1, 2)
    assert v.hook_template == "blocks.{layer}.hook_resid_post"  # llama.cpp: output of layer N
    expected = np.stack([directions[1], directions[2]]).astype(np.float32)
    assert np.array_equal(v.vectors.numpy(), expected)


def test_gguf_errors(tmp_path, tiny) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "cv.gguf"
    write_gguf(path, {1: np.ones(32)})
    with pytest.raises(ValueError, match="d_model=32"):
        load_vector(path, model=tiny)
    write_gguf(path, {1: np.array([1.0, np.nan])})
    with pytest.raises(ValueError, match="NaN"):
        load_vector(path)
    write_gguf(path, {1: np.ones(64)})
    with pytest.raises(ValueError, match=r"layers \[5\] are missing"):
        load_vector(path, layers=[5])
    write_gguf(path, {1: np.ones(64)}, arch="llama")
    with pytest.raises(ValueError, match="expected 'controlvector'"):
        load_vector(path)
    write_gguf(path, {1: np.ones(64)})
    path.write_bytes(path.read_bytes()[:40])  # truncated
    with pytest.raises(ValueError, match="not a readable GGUF"):
        load_vector(path)
