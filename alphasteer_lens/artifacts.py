"""Save and load fitted steering (AlphaSteer, ActAdd, directional ablation) as artifacts.

One ``.safetensors`` file: the tensors, and a JSON header with the model id, TransformerLens
version, hook template, layers, fit parameters, data hashes and package version. Loading checks
the content hash, shapes, dtypes and finiteness, and — given a model — the layers, ``d_model``
and hook names, each failure naming the field.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch

from alphasteer_lens.alphasteer import AlphaSteer
from alphasteer_lens.models import HookedModel, hook_names, model_name
from alphasteer_lens.steering import ActAdd, DirectionalAblation, Steering
from alphasteer_lens.storage import atomic_save_safetensors, load_safetensors_checked

_KINDS = {"alphasteer": AlphaSteer, "actadd": ActAdd, "ablation": DirectionalAblation}


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
    """Write ``steering`` atomically to ``path`` (safetensors + JSON metadata)."""
    path = Path(path)
    meta: dict[str, Any] = {
        "layers": list(steering.layers),
        "hook_template": steering.hook_template,
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


def _field(meta: Mapping[str, str], key: str, path: Path) -> Any:
    if key not in meta:
        raise ValueError(f"{path}: metadata field {key!r} is missing")
    try:
        return json.loads(meta[key])
    except json.JSONDecodeError:
        return meta[key]


def load_steering(path: str | Path, *, model: HookedModel | None = None) -> Steering:
    """Load a steering artifact; with ``model``, check that it fits that model."""
    path = Path(path)
    tensors, meta = load_safetensors_checked(path)
    kind = _field(meta, "kind", path)
    if kind not in _KINDS:
        raise ValueError(f"{path}: unknown steering kind {kind!r} (known: {sorted(_KINDS)})")
    layers = tuple(int(x) for x in _field(meta, "layers", path))
    template = str(_field(meta, "hook_template", path))
    expected = {"alphasteer": ("w", "r"), "actadd": ("vectors",), "ablation": ("directions",)}
    for name in expected[kind]:
        if name not in tensors:
            raise ValueError(f"{path}: tensor {name!r} is missing for kind {kind!r}")
        t = tensors[name]
        if t.dtype != torch.float32:
            raise ValueError(f"{path}: tensor {name!r} has dtype {t.dtype}, expected float32")
        if t.ndim != 2 or t.shape[0] != len(layers):
            raise ValueError(
                f"{path}: tensor {name!r} has shape {tuple(t.shape)}, expected "
                f"[{len(layers)}, d_model] for layers {list(layers)}"
            )
    if model is not None:
        d_model, n_layers = int(model.cfg.d_model), int(model.cfg.n_layers)
        d_art = next(iter(tensors.values())).shape[-1]
        if d_art != d_model:
            raise ValueError(
                f"{path}: artifact d_model={d_art} but the model has d_model={d_model} "
                f"(artifact made for {meta.get('model', 'an unknown model')})"
            )
        bad = [layer for layer in layers if layer >= n_layers]
        if bad:
            raise ValueError(f"{path}: layers {bad} out of range for a {n_layers}-layer model")
        known = hook_names(model)
        for layer in layers:
            name = template.format(layer=layer)
            if known and name not in known:
                raise ValueError(f"{path}: hook {name!r} does not exist on this model")
    if kind == "alphasteer":
        fit = _field(meta, "fit", path)
        return AlphaSteer(
            layers=layers,
            w=tensors["w"],
            r=tensors["r"],
            hook_template=template,
            alpha=float(fit["alpha"]),
            ratio=fit["ratio"],
            tol=fit["tol"],
            leakage=tuple(float(x) for x in fit["leakage"]),
        )
    if kind == "actadd":
        return ActAdd(layers, tensors["vectors"], template)
    return DirectionalAblation(layers, tensors["directions"], template)
