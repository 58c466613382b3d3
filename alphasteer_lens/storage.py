"""Safe storage: safetensors for tensors, JSON metadata, atomic writes, verified loads.

Nothing here unpickles or evaluates anything: a steering file from a stranger can be opened
safely. Every file carries a sha256 of its tensors in the metadata, checked on load, so a
truncated or edited file is refused with an error that says so.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

FORMAT = "alphasteer_lens"
CONTENT_HASH = "content_sha256"


def tensors_hash(tensors: Mapping[str, Tensor]) -> str:
    """sha256 over tensor names, dtypes, shapes and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def atomic_write_bytes(data: bytes, path: str | Path) -> None:
    """Write ``data`` to a temp file beside ``path``, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(obj: Any, path: str | Path) -> None:
    atomic_write_bytes((json.dumps(obj, indent=2, sort_keys=True) + "\n").encode(), path)


def atomic_save_safetensors(
    tensors: Mapping[str, Tensor], path: str | Path, metadata: Mapping[str, Any] | None = None
) -> None:
    """Save tensors with string metadata (non-strings JSON-encoded) and a content hash."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    meta["format"] = FORMAT
    meta[CONTENT_HASH] = tensors_hash(tensors)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, meta)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_metadata(path: str | Path) -> dict[str, str]:
    """The JSON header's metadata, without loading tensors."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def load_safetensors_checked(path: str | Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Load a file written by :func:`atomic_save_safetensors`, verifying its content hash."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"artifact not found: {path}")
    try:
        tensors = load_file(str(path))
        meta = read_metadata(path)
    except (SafetensorError, OSError, ValueError, json.JSONDecodeError) as e:
        raise ValueError(
            f"{path} is not a readable safetensors file (truncated or corrupt?): {e}"
        ) from e
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} was not written by alphasteer_lens (metadata 'format' missing)")
    expected = meta.get(CONTENT_HASH)
    actual = tensors_hash(tensors)
    if expected != actual:
        raise ValueError(
            f"{path}: content hash mismatch (metadata {expected}, tensors {actual}); "
            "the file was modified or corrupted"
        )
    for name, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise ValueError(f"{path}: tensor {name!r} contains NaN or inf")
    return tensors, meta
