"""Save and load fitted steering (AlphaSteer, ActAdd, directional ablation) as artifacts.

One ``.safetensors`` file: the tensors, and a JSON header with the model id, TransformerLens
version, hook template, layers, fit parameters, data hashes and package version. The content hash
covers the tensors and every metadata field (:mod:`alphasteer_lens.storage`). Loading then parses
the metadata with a strict schema (types, ranges, required fields; unknown fields refused), checks
shapes, dtypes and finiteness, and — given a model — the layers, ``d_model`` and hook names. Every
failure is one :class:`~alphasteer_lens.storage.ArtifactError` naming the field and the value.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from alphasteer_lens.alphasteer import AlphaSteer
from alphasteer_lens.hookpoints import check_template, hook_name
from alphasteer_lens.models import HookedModel, hook_names, model_name
from alphasteer_lens.steering import ActAdd, DirectionalAblation, Steering
from alphasteer_lens.storage import (
    CONTENT_HASH,
    HASH_SCOPE,
    ArtifactError,
    atomic_save_safetensors,
    load_safetensors_checked,
)

_KINDS = {"alphasteer": AlphaSteer, "actadd": ActAdd, "ablation": DirectionalAblation}
_TENSORS = {"alphasteer": ("w", "r"), "actadd": ("vectors",), "ablation": ("directions",)}
_STORAGE_FIELDS = {"format", HASH_SCOPE, CONTENT_HASH}
_MAX_LAYER = 2**31 - 1


def _version(pkg: str) -> str:
    try:
        return version(pkg)
    except PackageNotFoundError:
        return "unknown"


def save_steering(
    steering: Steering,
    path: str | Path,
    *,
    model: HookedModel | None = None,
    data_hashes: Mapping[str, str] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``steering`` atomically to ``path`` (safetensors + JSON metadata).

    ``extra`` (any JSON object, e.g. the chosen strength λ) is stored as is and comes back from
    :func:`load_steering_with_meta`.
    """
    path = Path(path)
    meta: dict[str, Any] = {
        "layers": list(steering.layers),
        "hook_template": check_template(steering.hook_template),
        "package_version": _version("alphasteer-lens"),
        "transformer_lens_version": _version("transformer-lens"),
        "data_hashes": dict(data_hashes or {}),
        "extra": dict(extra or {}),
    }
    if model is not None:
        meta["model"] = model_name(model)
        meta["d_model"] = int(model.cfg.d_model)
        meta["n_layers"] = int(model.cfg.n_layers)
    if isinstance(steering, AlphaSteer):
        meta["kind"] = "alphasteer"
        meta["fit"] = {
            "alpha": steering.alpha,
            "ratio": steering.ratio,
            "tol": steering.tol,
            "leakage": list(steering.leakage),
        }
        tensors = {"w": steering.w, "r": steering.r}
    elif isinstance(steering, ActAdd):
        meta["kind"] = "actadd"
        tensors = {"vectors": steering.vectors}
    else:
        meta["kind"] = "ablation"
        tensors = {"directions": steering.directions}
    atomic_save_safetensors({k: v.float() for k, v in tensors.items()}, path, meta)
    return path


# ------------------------------------------------------------------------- metadata schema


def _bad(path: Path, field: str, value: Any, want: str) -> ArtifactError:
    shown = repr(value)
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    return ArtifactError(f"{path}: metadata field {field!r} = {shown} is invalid: expected {want}")


def _is_int(x: Any) -> bool:
    return type(x) is int


def _is_number(x: Any) -> bool:
    return type(x) in (int, float) and math.isfinite(x)


def _json(path: Path, field: str, raw: str) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        raise _bad(path, field, raw, "valid JSON") from None


def _str(path: Path, field: str, raw: str) -> str:
    return raw


def _kind(path: Path, field: str, raw: str) -> str:
    if raw not in _KINDS:
        raise ArtifactError(f"{path}: unknown steering kind {raw!r} (known: {sorted(_KINDS)})")
    return raw


def _template(path: Path, field: str, raw: str) -> str:
    try:
        if not raw.isprintable():  # hookpoints' regex ends in ``$``, which allows a final "\n"
            raise ValueError(f"hook template {raw[:80]!r} is not allowed: unprintable characters")
        return check_template(raw)
    except ValueError as err:
        raise ArtifactError(f"{path}: metadata field {field!r}: {err}") from None


def _layers(path: Path, field: str, raw: str) -> list[int]:
    v = _json(path, field, raw)
    want = "a non-empty JSON list of unique non-negative ints"
    if not isinstance(v, list) or not v:
        raise _bad(path, field, v, want)
    for x in v:
        if not _is_int(x) or not 0 <= x <= _MAX_LAYER:
            raise _bad(path, field, v, f"{want}; {x!r} is not one")
    if len(set(v)) != len(v):
        raise _bad(path, field, v, f"{want}; it has duplicates")
    return v


def _positive_int(path: Path, field: str, raw: str) -> int:
    v = _json(path, field, raw)
    if not _is_int(v) or not 1 <= v <= _MAX_LAYER:
        raise _bad(path, field, v, "a positive int")
    return v


def _str_dict(path: Path, field: str, raw: str) -> dict[str, str]:
    v = _json(path, field, raw)
    if not isinstance(v, dict) or not all(isinstance(x, str) for x in v.values()):
        raise _bad(path, field, v, "a JSON object of strings")
    return v


def _object(path: Path, field: str, raw: str) -> dict[str, Any]:
    v = _json(path, field, raw)
    if not isinstance(v, dict):
        raise _bad(path, field, v, "a JSON object")
    return v


def _fit(path: Path, field: str, raw: str) -> dict[str, Any]:
    v = _object(path, field, raw)
    keys = {"alpha", "ratio", "tol", "leakage"}
    if set(v) != keys:
        raise _bad(path, field, sorted(v), f"exactly the keys {sorted(keys)}")
    if not _is_number(v["alpha"]) or v["alpha"] <= 0:
        raise _bad(path, "fit.alpha", v["alpha"], "a finite number > 0")
    for key in ("ratio", "tol"):
        x = v[key]
        if x is not None and not (_is_number(x) and 0 < x < 1):
            raise _bad(path, f"fit.{key}", x, "null or a number in (0, 1)")
    leak = v["leakage"]
    if not isinstance(leak, list) or not all(_is_number(x) and 0 <= x <= 1 for x in leak):
        raise _bad(path, "fit.leakage", leak, "a list of numbers in [0, 1]")
    return v


_Parser = Callable[[Path, str, str], Any]
_REQUIRED: dict[str, _Parser] = {"kind": _kind, "layers": _layers, "hook_template": _template}
_OPTIONAL: dict[str, _Parser] = {
    "model": _str,
    "package_version": _str,
    "transformer_lens_version": _str,
    "d_model": _positive_int,
    "n_layers": _positive_int,
    "data_hashes": _str_dict,
    "extra": _object,
    "prompt_format": _object,
    "fit": _fit,
}


def parse_metadata(meta: Mapping[str, str], path: str | Path = "artifact") -> dict[str, Any]:
    """The artifact's metadata, parsed and checked field by field (see the module docstring);
    the storage fields (format, hash) are left out."""
    path = Path(path)
    unknown = sorted(set(meta) - set(_REQUIRED) - set(_OPTIONAL) - _STORAGE_FIELDS)
    if unknown:
        raise ArtifactError(f"{path}: unknown metadata field {unknown[0][:80]!r}")
    out: dict[str, Any] = {}
    for key, parse in _REQUIRED.items():
        if key not in meta:
            raise ArtifactError(f"{path}: metadata field {key!r} is missing")
        out[key] = parse(path, key, meta[key])
    for key, parse in _OPTIONAL.items():
        if key in meta:
            out[key] = parse(path, key, meta[key])
    if out["kind"] == "alphasteer" and "fit" not in out:
        raise ArtifactError(f"{path}: metadata field 'fit' is missing for kind 'alphasteer'")
    leak = out.get("fit", {}).get("leakage")
    if leak and len(leak) != len(out["layers"]):
        raise _bad(path, "fit.leakage", leak, f"{len(out['layers'])} values, one per layer")
    if "n_layers" in out and max(out["layers"]) >= out["n_layers"]:
        raise _bad(path, "layers", out["layers"], f"layers below n_layers={out['n_layers']}")
    return out


def _check_tensors(path: Path, tensors: Mapping[str, Tensor], meta: Mapping[str, Any]) -> int:
    """Check names, dtypes and shapes against the metadata; return ``d_model``."""
    kind, layers = meta["kind"], meta["layers"]
    names = _TENSORS[kind]
    for name in names:
        if name not in tensors:
            raise ArtifactError(f"{path}: tensor {name!r} is missing for kind {kind!r}")
    extra = sorted(set(tensors) - set(names))
    if extra:
        raise ArtifactError(f"{path}: unexpected tensor {extra[0][:80]!r} for kind {kind!r}")
    widths = set()
    for name in names:
        t = tensors[name]
        if t.dtype != torch.float32:
            raise ArtifactError(f"{path}: tensor {name!r} has dtype {t.dtype}, expected float32")
        if t.ndim != 2 or t.shape[0] != len(layers) or t.shape[1] == 0:
            raise ArtifactError(
                f"{path}: tensor {name!r} has shape {tuple(t.shape)}, expected "
                f"[{len(layers)}, d_model] for layers {layers}"
            )
        widths.add(int(t.shape[1]))
    if len(widths) > 1:
        raise ArtifactError(f"{path}: tensors {list(names)} differ in width {sorted(widths)}")
    width = widths.pop()
    if "d_model" in meta and meta["d_model"] != width:
        raise _bad(path, "d_model", meta["d_model"], f"{width}, the width of the tensors")
    return width


def _check_model(path: Path, meta: Mapping[str, Any], width: int, model: HookedModel) -> None:
    d_model, n_layers = int(model.cfg.d_model), int(model.cfg.n_layers)
    if width != d_model:
        raise ArtifactError(
            f"{path}: artifact d_model={width} but the model has d_model={d_model} "
            f"(artifact made for {meta.get('model', 'an unknown model')})"
        )
    bad = [layer for layer in meta["layers"] if layer >= n_layers]
    if bad:
        raise ArtifactError(f"{path}: layers {bad} out of range for a {n_layers}-layer model")
    known = hook_names(model)
    for layer in meta["layers"]:
        name = hook_name(meta["hook_template"], layer)
        if known and name not in known:
            raise ArtifactError(f"{path}: hook {name!r} does not exist on this model")


def load_steering_with_meta(
    path: str | Path, *, model: HookedModel | None = None
) -> tuple[Steering, dict[str, Any]]:
    """Load a steering artifact and its parsed metadata (``kind``, ``layers``,
    ``hook_template``, ``fit``, ``extra``, ``data_hashes``, ``model``, ...); with ``model``,
    check that it fits that model. Errors: :class:`~alphasteer_lens.storage.ArtifactError`
    (a ``ValueError``), or ``FileNotFoundError``."""
    path = Path(path)
    tensors, raw = load_safetensors_checked(path)
    meta = parse_metadata(raw, path)
    width = _check_tensors(path, tensors, meta)
    if model is not None:
        _check_model(path, meta, width, model)
    layers, template = tuple(meta["layers"]), meta["hook_template"]
    steering: Steering
    try:
        if meta["kind"] == "alphasteer":
            fit = meta["fit"]
            steering = AlphaSteer(
                layers=layers,
                w=tensors["w"],
                r=tensors["r"],
                hook_template=template,
                alpha=float(fit["alpha"]),
                ratio=fit["ratio"],
                tol=fit["tol"],
                leakage=tuple(float(x) for x in fit["leakage"]),
            )
        elif meta["kind"] == "actadd":
            steering = ActAdd(layers, tensors["vectors"], template)
        else:
            steering = DirectionalAblation(layers, tensors["directions"], template)
    except ValueError as err:
        raise ArtifactError(f"{path}: {err}") from None
    return steering, meta


def load_steering(path: str | Path, *, model: HookedModel | None = None) -> Steering:
    """Load a steering artifact; with ``model``, check that it fits that model
    (:func:`load_steering_with_meta` without the metadata)."""
    return load_steering_with_meta(path, model=model)[0]
