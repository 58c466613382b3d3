"""Artifacts: round trips, validation against the model, corrupt files, atomic writes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from alphasteer_lens.alphasteer import AlphaSteer
from alphasteer_lens.artifacts import load_steering, save_steering
from alphasteer_lens.steering import ActAdd, DirectionalAblation
from alphasteer_lens.storage import atomic_save_safetensors, load_safetensors_checked


def _steer(d: int = 64) -> AlphaSteer:
    g = torch.Generator().manual_seed(1)
    return AlphaSteer(
        layers=(1, 3),
        w=torch.randn(2, d, generator=g),
        r=torch.randn(2, d, generator=g),
        alpha=10.0,
        ratio=0.5,
        leakage=(0.01, 0.02),
    )


def test_roundtrip_all_kinds(tmp_path: Path, tiny) -> None:  # type: ignore[no-untyped-def]
    items = [
        _steer(),
        ActAdd((0, 2), torch.randn(2, 64)),
        DirectionalAblation((1,), torch.randn(1, 64)),
    ]
    for i, st in enumerate(items):
        path = save_steering(
            st, tmp_path / f"s{i}.safetensors", model=tiny, data_hashes={"benign": "abc"}
        )
        back = load_steering(path, model=tiny)
        assert type(back) is type(st)
        assert back.layers == st.layers
        for name in ("w", "r", "vectors", "directions"):
            if hasattr(st, name):
                assert torch.equal(getattr(back, name), getattr(st, name))
    meta = json.loads(json.dumps(dict(_read_meta(tmp_path / "s0.safetensors"))))
    assert meta["kind"] == "alphasteer"
    assert json.loads(meta["data_hashes"]) == {"benign": "abc"}
    for key in ("model", "transformer_lens_version", "package_version", "hook_template", "fit"):
        assert key in meta


def _read_meta(path: Path) -> dict[str, str]:
    from alphasteer_lens.storage import read_metadata

    return read_metadata(path)


def test_wrong_model(tmp_path: Path, tiny) -> None:  # type: ignore[no-untyped-def]
    path = save_steering(_steer(d=32), tmp_path / "a.safetensors")
    with pytest.raises(ValueError, match="d_model=32 but the model has d_model=64"):
        load_steering(path, model=tiny)
    path = save_steering(ActAdd((7,), torch.randn(1, 64)), tmp_path / "b.safetensors")
    with pytest.raises(ValueError, match=r"layers \[7\] out of range"):
        load_steering(path, model=tiny)


def test_missing_and_corrupt_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_steering(tmp_path / "nope.safetensors")
    path = save_steering(_steer(), tmp_path / "a.safetensors")
    data = path.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_steering(tmp_path / "trunc.safetensors")
    flipped = bytearray(data)
    flipped[-3] ^= 0xFF
    (tmp_path / "flip.safetensors").write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match="content hash mismatch"):
        load_steering(tmp_path / "flip.safetensors")


def test_foreign_file_refused(tmp_path: Path) -> None:
    save_file({"w": torch.zeros(2, 4)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(ValueError, match="not written by alphasteer_lens"):
        load_steering(tmp_path / "x.safetensors")


def test_nan_refused(tmp_path: Path) -> None:
    t = {"vectors": torch.tensor([[float("nan"), 0.0]])}
    atomic_save_safetensors(t, tmp_path / "n.safetensors", {"kind": "actadd", "layers": [0]})
    with pytest.raises(ValueError, match="NaN or inf"):
        load_safetensors_checked(tmp_path / "n.safetensors")


def test_missing_metadata_field(tmp_path: Path) -> None:
    atomic_save_safetensors(
        {"vectors": torch.zeros(1, 4)}, tmp_path / "m.safetensors", {"kind": "actadd"}
    )
    with pytest.raises(ValueError, match="'layers' is missing"):
        load_steering(tmp_path / "m.safetensors")


def test_interrupted_write_leaves_no_partial_file(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A writer killed mid-way leaves the old file intact and no temp file; a rerun works."""
    path = save_steering(_steer(), tmp_path / "a.safetensors")
    before = path.read_bytes()

    def boom(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(KeyboardInterrupt):
        save_steering(ActAdd((0,), torch.ones(1, 64)), path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors"]
    save_steering(ActAdd((0,), torch.ones(1, 64)), path)
    assert isinstance(load_steering(path), ActAdd)


def test_no_pickle_or_eval_in_package() -> None:
    """Loading an artifact must never run code: no pickle, no unsafe torch.load, no eval."""
    root = Path(__file__).resolve().parents[1] / "alphasteer_lens"
    for f in root.rglob("*.py"):
        src = f.read_text()
        assert "import pickle" not in src and "pickle." not in src, f
        assert "eval(" not in src.replace(".eval(", ""), f
        assert "exec(" not in src, f
        if "torch.load(" in src:
            assert "weights_only=True" in src, f
