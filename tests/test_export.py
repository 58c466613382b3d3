"""GGUF control-vector export: layer convention, refusals, and the round trip through the
package's own GGUF reader and the gguf package's."""

from __future__ import annotations

from dataclasses import dataclass

import gguf
import numpy as np
import pytest
import torch

from alphasteer_lens.alphasteer import AlphaSteer
from alphasteer_lens.benign_vectors import load_vector
from alphasteer_lens.export import (
    control_directions,
    cvec_buffer,
    direction_index,
    export_command,
    to_control_vector,
)
from alphasteer_lens.hookpoints import RESID_MID, RESID_POST, RESID_PRE
from alphasteer_lens.steering import ActAdd, Composition, DirectionalAblation


def _actadd(layers: tuple[int, ...], template: str = RESID_PRE, d: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return ActAdd(layers, torch.randn(len(layers), d, generator=g), template)


def test_layer_convention() -> None:
    assert direction_index("blocks.5.hook_resid_pre") == 4
    assert direction_index("blocks.5.hook_resid_post") == 5
    assert direction_index("blocks.2.hook_resid_pre") == 1
    assert direction_index("blocks.1.hook_resid_post") == 1


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("blocks.3.hook_resid_mid", "output of a layer"),
        ("blocks.3.hook_attn_out", "output of a layer"),
        ("blocks.0.hook_resid_pre", "never steers the output of layer 0"),
        ("blocks.1.hook_resid_pre", "never steers the output of layer 0"),
        ("blocks.0.hook_resid_post", "never steers the output of layer 0"),
    ],
)
def test_unexpressible_hooks_refused(name: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        direction_index(name)


def test_round_trip_bit_exact(tmp_path) -> None:  # type: ignore[no-untyped-def]
    steering = _actadd((3, 7, 9))
    lam = 1.37
    path = to_control_vector(steering, lam, tmp_path / "v.gguf", model_hint="llama")
    back = load_vector(path)
    assert back.layers == (2, 6, 8)  # resid_pre of l = resid_post of l - 1
    assert back.hook_template == RESID_POST
    expected = torch.tensor(lam, dtype=torch.float32) * steering.vectors
    assert torch.equal(back.vectors, expected)  # bit for bit: the runtime's own float32 product
    # exporting what was read, at strength 1, writes the same bytes
    again = to_control_vector(back, 1.0, tmp_path / "w.gguf", model_hint="llama")
    assert again.read_bytes() == path.read_bytes()


def test_gguf_metadata_as_llama_cpp_reads_it(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = to_control_vector(
        _actadd((4, 5), RESID_POST), 2.0, tmp_path / "v.gguf", model_hint="qwen2"
    )
    reader = gguf.GGUFReader(path)
    fields = reader.fields
    assert fields["general.architecture"].contents() == "controlvector"
    assert fields["controlvector.model_hint"].contents() == "qwen2"
    assert fields["controlvector.layer_count"].contents() == 2
    names = [t.name for t in reader.tensors]
    assert names == ["direction.4", "direction.5"]
    for t in reader.tensors:
        assert t.tensor_type == gguf.GGMLQuantizationType.F32
        assert list(t.shape) == [8]


def test_positions_other_than_all_refused(tmp_path) -> None:  # type: ignore[no-untyped-def]
    for positions in ("prompt", "last", "instruction_end"):
        with pytest.raises(ValueError, match="every position, prompt and generated"):
            to_control_vector(_actadd((3,)), 1.0, tmp_path / "v.gguf", positions=positions)
    assert not (tmp_path / "v.gguf").exists()


def test_non_additive_steerings_refused(tmp_path) -> None:  # type: ignore[no-untyped-def]
    d = torch.randn(1, 8)
    alpha = AlphaSteer((3,), d, d)
    for steering in (alpha, DirectionalAblation((3,), d)):
        with pytest.raises(ValueError, match="only additive steerings"):
            to_control_vector(steering, 1.0, tmp_path / "v.gguf")
    with pytest.raises(ValueError, match="only additive steerings"):
        to_control_vector(Composition(((_actadd((3,)), 1.0), (alpha, 1.0))), 1.0, tmp_path / "v")


def test_composition_sums_per_direction() -> None:
    a, b = _actadd((3, 4)), _actadd((3,), RESID_POST, seed=1)  # pre 4 and post 3: both il = 3
    out = control_directions(Composition(((a, 2.0), (b, -0.5))), 1.5)
    assert sorted(out) == [2, 3]
    assert torch.equal(out[2], torch.tensor(3.0) * a.vectors[0])
    expected = torch.tensor(3.0) * a.vectors[1] + torch.tensor(-0.75) * b.vectors[0]
    assert torch.equal(out[3], expected)


def test_scans_like_object_exports_its_actadd(tmp_path) -> None:  # type: ignore[no-untyped-def]
    @dataclass(frozen=True)
    class FixedSign:
        vectors: torch.Tensor

        def steering(self) -> ActAdd:
            return ActAdd((2, 3), self.vectors, RESID_POST)

    v = torch.randn(2, 8)
    back = load_vector(to_control_vector(FixedSign(v), -4.0, tmp_path / "s.gguf"))
    assert back.layers == (2, 3)
    assert torch.equal(back.vectors, torch.tensor(-4.0) * v)


def test_layer_range_and_bad_strength(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match="the model has 4 layers"):
        control_directions(_actadd((4,), RESID_POST), 1.0, n_layers=4)
    with pytest.raises(ValueError, match="finite"):
        control_directions(_actadd((3,)), float("nan"))
    with pytest.raises(ValueError, match="overflows float32"):
        control_directions(ActAdd((3,), torch.full((1, 8), 1e30)), 1e10)
    with pytest.raises(ValueError, match="hook_resid_post"):
        control_directions(_actadd((3,), RESID_MID), 1.0)


def test_cvec_buffer_layout() -> None:
    v2, v4 = torch.ones(8), torch.full((8,), 2.0)
    buf = cvec_buffer({2: v2, 4: v4}, n_layers=6)
    assert buf.shape == (5 * 8,)
    rows = buf.reshape(5, 8)
    assert torch.equal(rows[1], v2) and torch.equal(rows[3], v4)  # row il - 1
    assert rows[[0, 2, 4]].abs().sum() == 0
    with pytest.raises(ValueError, match="outside layers"):
        cvec_buffer({6: v2}, n_layers=6)


def test_export_command(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    from safetensors.torch import save_file

    v = torch.randn(2, 8)
    src = tmp_path / "vec.safetensors"
    save_file({"blocks.5.hook_resid_pre": v[0], "blocks.6.hook_resid_pre": v[1]}, str(src))
    out = tmp_path / "out.gguf"
    export_command(src, out, strength=0.5)
    assert "direction.{4,5}" in capsys.readouterr().out
    back = load_vector(out)
    assert back.layers == (4, 5)
    np.testing.assert_array_equal(back.vectors.numpy(), (torch.tensor(0.5) * v).numpy())
