"""Artifacts: round trips, validation against the model, corrupt files, atomic writes."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from alphasteer_lens.alphasteer import AlphaSteer
from alphasteer_lens.artifacts import load_steering, load_steering_with_meta, save_steering
from alphasteer_lens.steering import ActAdd, DirectionalAblation
from alphasteer_lens.storage import ArtifactError, atomic_save_safetensors, load_safetensors_checked


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


# ---------------------------------------------------------------- hardening (issue 13)


def _resave(path: Path, **changes: str) -> Path:
    """Rewrite ``path`` with some metadata fields changed and the old hash kept: what editing
    the header by hand does."""
    from safetensors.torch import load_file, save

    from alphasteer_lens.storage import read_metadata

    meta = read_metadata(path) | changes
    out = path.with_name("edited.safetensors")
    out.write_bytes(save(load_file(str(path)), meta))
    return out


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("layers", "[2, 3]"),
        ("hook_template", "blocks.{layer}.hook_resid_post"),
        ("d_model", "32"),
        ("fit", '{"alpha": 1000.0, "ratio": 0.5, "tol": null, "leakage": [0.01, 0.02]}'),
        ("extra", '{"strength": 9.0}'),
        ("model", "someone-else/model"),
    ],
)
def test_editing_any_metadata_field_is_a_named_error(
    tmp_path: Path, tiny, field: str, value: str
) -> None:  # type: ignore[no-untyped-def]
    """Defect 1: the hash covered only the tensors, so these edits loaded silently (and passed
    load_steering(model=...))."""
    path = save_steering(_steer(), tmp_path / "a.safetensors", model=tiny)
    edited = _resave(path, **{field: value})
    with pytest.raises(ArtifactError, match="content hash mismatch.*metadata field"):
        load_steering(edited, model=tiny)


def test_artifact_from_the_old_tensor_only_hash_is_refused_clearly(tmp_path: Path) -> None:
    from safetensors.torch import save

    from alphasteer_lens.storage import tensors_hash

    t = {"vectors": torch.ones(1, 4)}
    meta = {"format": "alphasteer_lens", "content_sha256": tensors_hash(t), "kind": "actadd"}
    meta |= {"layers": "[0]", "hook_template": "blocks.{layer}.hook_resid_pre"}
    (tmp_path / "old.safetensors").write_bytes(save(t, meta))
    with pytest.raises(ArtifactError, match="older alphasteer_lens.*save it again"):
        load_steering(tmp_path / "old.safetensors")


def _artifact(tmp_path: Path, **meta: Any) -> Path:
    """A file with a valid hash and the given metadata (an ActAdd at layers [1, 2])."""
    fields: dict[str, Any] = {
        "kind": "actadd",
        "layers": [1, 2],
        "hook_template": "blocks.{layer}.hook_resid_pre",
    }
    fields.update(meta)
    fields = {k: v for k, v in fields.items() if v is not None}
    tensors = {"vectors": torch.ones(2, 64)} if fields.get("kind") != "alphasteer" else {}
    if fields.get("kind") == "alphasteer":
        tensors = {"w": torch.ones(2, 64), "r": torch.ones(2, 64)}
    atomic_save_safetensors(tensors, tmp_path / "x.safetensors", fields)
    return tmp_path / "x.safetensors"


@pytest.mark.parametrize(
    "template",
    [
        "{layer:>300000000}",
        "blocks.{layer:>300000000}.hook_resid_pre",
        "blocks.3.hook_resid_pre",  # a constant: would steer layer 3 for every row
        "blocks.{0}.hook_resid_pre",
        "blocks.{nope}.hook_resid_pre",
        "blocks.{layer}.{layer}.hook_resid_pre",
        "blocks.{layer}.hook_resid_nowhere",
        "blocks.{layer}.hook_resid_pre\n",
    ],
)
def test_hook_template_is_checked_never_formatted(tmp_path: Path, template: str) -> None:
    """Defect 2: str.format ran on the stored template (860 MiB for the first one, raw
    IndexError / KeyError for the next ones, a constant hook for every layer)."""
    path = _artifact(tmp_path, hook_template=template)
    with pytest.raises(ArtifactError, match=r"'hook_template'.* is not allowed") as err:
        load_steering(path)
    assert len(str(err.value)) < 600


@pytest.mark.parametrize(
    ("meta", "match"),
    [
        ({"layers": [1.9, 2.2]}, r"'layers' = \[1.9, 2.2\] is invalid"),
        ({"layers": [True, 2]}, r"'layers' = \[True, 2\] is invalid"),
        ({"layers": "1, 2"}, r"'layers' = '1, 2' is invalid: expected valid JSON"),
        ({"layers": [-1, 2]}, r"'layers' = \[-1, 2\] is invalid"),
        ({"layers": [2, 2]}, r"'layers' = \[2, 2\] is invalid.*duplicates"),
        ({"layers": []}, r"'layers' = \[\] is invalid"),
        ({"layers": {"a": 1}}, r"'layers' = \{'a': 1\} is invalid"),
        ({"d_model": 64.0}, r"'d_model' = 64.0 is invalid: expected a positive int"),
        ({"d_model": [64]}, r"'d_model' = \[64\] is invalid: expected a positive int"),
        ({"d_model": 0}, r"'d_model' = 0 is invalid"),
        ({"d_model": 32}, r"'d_model' = 32 is invalid: expected 64, the width"),
        ({"n_layers": 2}, r"'layers' = \[1, 2\] is invalid: expected layers below n_layers=2"),
        ({"data_hashes": [1]}, r"'data_hashes' = \[1\] is invalid"),
        ({"extra": [0.5]}, r"'extra' = \[0.5\] is invalid: expected a JSON object"),
        ({"kind": 3}, r"unknown steering kind '3'"),
        ({"layers": None}, r"metadata field 'layers' is missing"),
        ({"surprise": 1}, r"unknown metadata field 'surprise'"),
        ({"kind": "alphasteer"}, r"metadata field 'fit' is missing"),
        (
            {
                "kind": "alphasteer",
                "fit": {"alpha": "10", "ratio": 0.5, "tol": None, "leakage": []},
            },
            r"'fit.alpha' = '10' is invalid",
        ),
        (
            {
                "kind": "alphasteer",
                "fit": {"alpha": 1e400, "ratio": 0.5, "tol": None, "leakage": []},
            },
            r"'fit.alpha' = inf is invalid",
        ),
        (
            {"kind": "alphasteer", "fit": {"alpha": 1.0, "ratio": 1.5, "tol": None, "leakage": []}},
            r"'fit.ratio' = 1.5 is invalid",
        ),
        (
            {
                "kind": "alphasteer",
                "fit": {"alpha": 1.0, "ratio": 0.5, "tol": None, "leakage": [0.1]},
            },
            r"'fit.leakage' = \[0.1\] is invalid: expected 2 values",
        ),
        (
            {"kind": "alphasteer", "fit": {"alpha": 1.0, "ratio": 0.5, "tol": None}},
            r"'fit' = \['alpha', 'ratio', 'tol'\] is invalid",
        ),
    ],
)
def test_metadata_schema_errors_name_field_and_value(
    tmp_path: Path, meta: dict, match: str
) -> None:
    """Defect 6: wrongly typed metadata gave raw TypeError / 'invalid literal' errors, and float or
    bool layers silently became ints."""
    path = _artifact(tmp_path, **meta)
    with pytest.raises(ArtifactError, match=match):
        load_steering(path)


def test_hook_names_are_checked_against_the_model(tmp_path: Path, tiny) -> None:  # type: ignore[no-untyped-def]
    class Stub:
        cfg = tiny.cfg
        hook_dict = {f"blocks.{i}.hook_resid_pre": None for i in range(4)}

    path = _artifact(tmp_path, hook_template="blocks.{layer}.hook_mlp_out")
    with pytest.raises(ArtifactError, match="hook 'blocks.1.hook_mlp_out' does not exist"):
        load_steering(path, model=Stub())  # type: ignore[arg-type]
    assert load_steering(_artifact(tmp_path), model=Stub()).layers == (1, 2)  # type: ignore[arg-type]


def test_load_with_meta_returns_the_stored_fields(tmp_path: Path, tiny) -> None:  # type: ignore[no-untyped-def]
    """The chosen strength kept in ``extra`` (and the fit) comes back with the steering."""
    st = _steer()
    path = save_steering(
        st, tmp_path / "a.safetensors", model=tiny, extra={"strength": 0.4, "note": "λ chosen"}
    )
    back, meta = load_steering_with_meta(path, model=tiny)
    assert isinstance(back, AlphaSteer) and torch.equal(back.w, st.w)
    assert meta["extra"] == {"strength": 0.4, "note": "λ chosen"}
    assert meta["layers"] == [1, 3] and meta["d_model"] == 64 and meta["n_layers"] == 4
    assert meta["fit"] == {"alpha": 10.0, "ratio": 0.5, "tol": None, "leakage": [0.01, 0.02]}
    assert meta["hook_template"] == "blocks.{layer}.hook_resid_pre"
    assert "format" not in meta and "content_sha256" not in meta
