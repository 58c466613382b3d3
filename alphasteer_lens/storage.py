"""Safe storage: safetensors for tensors, JSON metadata, atomic writes, verified loads.

Nothing here unpickles or evaluates anything: a steering file from a stranger can be opened
safely. Every file carries a sha256 over its tensors **and** its canonical metadata (the whole
header but the hash itself), checked on load, so a truncated file, or one whose tensors or any
metadata field (layers, hook template, ``d_model``, ...) were edited, is refused with an
:class:`ArtifactError` that says so. The hash is a checksum, not a signature: it catches edits
and corruption, not someone who recomputes it.

Writes go to a temporary file beside the target (named after the host and process id), are
fsynced and renamed over the target, so a reader never sees half a file. A writer killed
mid-way (SIGKILL cannot be caught) leaves only its temporary file, which the next write to
the same target removes once that process is gone. Equal content gives equal bytes: the
safetensors header is rewritten with sorted keys (safetensors itself writes its metadata in
hash order, which changes from run to run).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import struct
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import Tensor

FORMAT = "alphasteer_lens"
CONTENT_HASH = "content_sha256"
HASH_SCOPE = "hash_scope"
SCOPE = "tensors+metadata"


class ArtifactError(ValueError):
    """A file written by (or claimed to be from) alphasteer_lens that cannot be used: unreadable,
    foreign, edited, or with metadata that fails its schema. The message names the file and
    the field."""


def tensors_hash(tensors: Mapping[str, Tensor]) -> str:
    """sha256 over tensor names, dtypes, shapes and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def content_hash(tensors: Mapping[str, Tensor], metadata: Mapping[str, str]) -> str:
    """sha256 over the canonical metadata (sorted keys, compact JSON, without the hash field
    itself) and then :func:`tensors_hash`: editing any field or any tensor changes it."""
    meta = {k: v for k, v in metadata.items() if k != CONTENT_HASH}
    canon = json.dumps(meta, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    h = hashlib.sha256()
    h.update(len(canon).to_bytes(8, "big"))
    h.update(canon)
    h.update(tensors_hash(tensors).encode())
    return h.hexdigest()


_HOST = socket.gethostname()


def _tmp_prefix(path: Path) -> str:
    return f".{path.name}.{_HOST}@{os.getpid()}@"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_orphans(path: str | Path) -> list[Path]:
    """Delete temporary files of ``path`` left by writers on this host that no longer run.

    Only files named by :func:`atomic_write_bytes` / :func:`atomic_save_safetensors` for this
    target are considered, and only when their process id is gone, so a concurrent writer's file
    is never touched. Returns the files removed.
    """
    path = Path(path)
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.(?P<host>.+)@(?P<pid>\d+)@[^@/]*\.tmp$")
    removed = []
    for p in path.parent.glob(".*.tmp") if path.parent.is_dir() else ():
        m = pattern.match(p.name)
        if m and m["host"] == _HOST and not _alive(int(m["pid"])):
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def temp_tag() -> str:
    """``host@pid@``: put in a temporary file's or folder's name so that
    :func:`remove_stale_temps` can tell whether its writer still runs."""
    return f"{_HOST}@{os.getpid()}@"


_TAG = re.compile(r"@(\d+)@")


def remove_stale_temps(
    directory: str | Path, prefix: str, suffix: str = "", *, legacy_age_s: float = 3600.0
) -> list[Path]:
    """Delete files or folders in ``directory`` named ``prefix…suffix`` whose writer is gone:
    tagged by :func:`temp_tag` with this host and a process id that no longer runs, or untagged
    (written by an older version) and not modified for ``legacy_age_s`` seconds. Another host's
    or a live process's temporaries are never touched. Returns what was removed."""
    directory = Path(directory)
    removed: list[Path] = []
    if not directory.is_dir():
        return removed
    for p in directory.iterdir():
        name = p.name
        if not (name.startswith(prefix) and name.endswith(suffix)) or name == prefix:
            continue
        tag = _TAG.search(name[len(prefix) :])
        if tag is not None:
            mine = name[len(prefix) :].startswith(f"{_HOST}@{tag.group(1)}@")
            if not mine or _alive(int(tag.group(1))):
                continue
        else:
            try:
                if time.time() - p.lstat().st_mtime < legacy_age_s:
                    continue
            except OSError:
                continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def _fsync_dir(directory: Path) -> None:
    """Make a rename durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    with contextlib.suppress(OSError):
        os.fsync(fd)
    os.close(fd)


def _write(f: Any, chunks: Sequence[bytes | memoryview]) -> None:
    for chunk in chunks:
        f.write(chunk)


def atomic_write_bytes(data: bytes | Sequence[bytes | memoryview], path: str | Path) -> None:
    """Write ``data`` (bytes, or chunks written one after another) to a temp file beside
    ``path``, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_orphans(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_tmp_prefix(path), suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            _write(f, [data] if isinstance(data, bytes) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_json(obj: Any, path: str | Path) -> None:
    atomic_write_bytes((json.dumps(obj, indent=2, sort_keys=True) + "\n").encode(), path)


def _canonical_header(data: bytes) -> list[bytes | memoryview]:
    """The safetensors bytes as chunks, the JSON header re-encoded with sorted keys and compact
    separators and padded to its original length, so the tensor bytes (a view, not a copy) do
    not move."""
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    new = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    if len(new) > n:  # same content re-encodes to the same length; if escaping ever
        return [data]  # differed, keep the (valid) bytes as safetensors wrote them
    return [data[:8], new + b" " * (n - len(new)), memoryview(data)[8 + n :]]


def atomic_save_safetensors(
    tensors: Mapping[str, Tensor], path: str | Path, metadata: Mapping[str, Any] | None = None
) -> None:
    """Save tensors with string metadata (non-strings JSON-encoded) and a content hash over
    both (:func:`content_hash`).

    Atomic (temp file, fsync, rename) and byte-deterministic: equal tensors and metadata give
    an identical file. The file is serialised in memory first (peak memory: the tensors plus
    one serialised copy) and written through :func:`atomic_write_bytes`: safetensors' own
    ``save_file`` stages its writes in a temporary file of its own naming, which a killed writer
    would leave behind.
    """
    path = Path(path)
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    meta["format"] = FORMAT
    meta[HASH_SCOPE] = SCOPE
    meta.pop(CONTENT_HASH, None)
    meta[CONTENT_HASH] = content_hash(tensors, meta)
    data = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, meta)
    atomic_write_bytes(_canonical_header(data), path)


def read_metadata(path: str | Path) -> dict[str, str]:
    """The JSON header's metadata, without loading tensors."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def load_safetensors_checked(path: str | Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Load a file written by :func:`atomic_save_safetensors`, verifying its content hash (over
    tensors and metadata) and that floating tensors are finite. Any failure is an
    :class:`ArtifactError` naming the file; a missing file is a ``FileNotFoundError``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"artifact not found: {path}")
    try:
        tensors = load_file(str(path))
        meta = read_metadata(path)
    except (SafetensorError, OSError, ValueError, RuntimeError, OverflowError) as e:
        raise ArtifactError(
            f"{path} is not a readable safetensors file (truncated or corrupt?): {str(e)[:300]}"
        ) from e
    if meta.get("format") != FORMAT:
        raise ArtifactError(
            f"{path} was not written by alphasteer_lens (metadata 'format' missing)"
        )
    if meta.get(HASH_SCOPE) != SCOPE:
        raise ArtifactError(
            f"{path} was written by an older alphasteer_lens whose hash did not cover the "
            "metadata, so its fields cannot be trusted; save it again with this version"
        )
    expected = meta.get(CONTENT_HASH)
    actual = content_hash(tensors, meta)
    if expected != actual:
        raise ArtifactError(
            f"{path}: content hash mismatch (metadata {str(expected)[:64]}, content {actual}); "
            "the tensors or a metadata field were modified, or the file is corrupted"
        )
    for name, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t.float()).all():
            raise ArtifactError(f"{path}: tensor {name!r} contains NaN or inf")
    return tensors, meta
