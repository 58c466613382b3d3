"""Benign steering vectors (always comply; answer in JSON), and loading user-supplied vectors.

Built from contrastive pairs of benign instructions, per layer at ``blocks.{l}.hook_resid_pre``
(Xiong et al., 2026, audit such vectors for what they cost in safety):

- :func:`compliance_vector`: the same instruction with the assistant reply opened by a
  compliance phrase ("Sure, here is") vs a refusal phrase ("I'm sorry, but I can't");
  activations averaged over the reply-prefix tokens, then ``mean(comply) − mean(refuse)``
  (or the first principal component of the paired differences);
- :func:`json_vector`: ``"X Answer in JSON format."`` vs ``"X"``, difference in means at the
  last prompt token.

:func:`load_vector` reads a vector made elsewhere, as an :class:`~alphasteer_lens.steering.ActAdd`:

- safetensors: one 1-D float tensor ``[d_model]`` per layer, named by the TransformerLens hook it
  is added at, ``blocks.{L}.hook_resid_pre`` or ``blocks.{L}.hook_resid_post`` (one kind per
  file), or repeng-style ``direction.{L}`` (read as ``blocks.{L}.hook_resid_post``). A steering
  artifact written by :func:`~alphasteer_lens.artifacts.save_steering` (kind ``actadd``) also
  loads, its content hash checked.
- GGUF control vector (repeng / llama.cpp): ``general.architecture = "controlvector"``, f32
  tensors ``direction.{N}`` of shape ``[n_embd]``. llama.cpp adds ``direction.N`` to the output
  of layer ``N``, so it maps to ``blocks.{N}.hook_resid_post`` (= ``blocks.{N+1}.hook_resid_pre``).
"""

from __future__ import annotations

import math
import re
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from alphasteer_lens.activations import RESID_PRE, cache_activations
from alphasteer_lens.chat import chat_lengths
from alphasteer_lens.models import HookedModel
from alphasteer_lens.steering import ActAdd
from alphasteer_lens.storage import ArtifactError

RESID_POST = "blocks.{layer}.hook_resid_post"
COMPLY_PREFIX = "Sure, here is"
REFUSE_PREFIX = "I'm sorry, but I can't"
JSON_SUFFIX = " Answer in JSON format."
GGUF_MAGIC = b"GGUF"
_HOOK_NAME = re.compile(r"^blocks\.(\d+)\.hook_resid_(pre|post)$")
_DIRECTION = re.compile(r"^direction\.(\d+)$")

Method = Literal["mean", "pca"]


def _reply_tokens(model: HookedModel, prompts: Sequence[str], prefix: str) -> int:
    """Tokens the assistant ``prefix`` adds after the chat template, fewest over ``prompts``
    (so the last that many positions are reply tokens for every prompt)."""
    with_prefix = chat_lengths(model, prompts, assistant_prefix=prefix)
    without = chat_lengths(model, prompts)
    k = min(a - b for a, b in zip(with_prefix, without, strict=True))
    if k < 1:
        raise ValueError(f"assistant prefix {prefix!r} adds no tokens after the chat template")
    return k


def paired_direction(
    positive: Float[Tensor, "n d_model"], negative: Float[Tensor, "n d_model"], method: Method
) -> Float[Tensor, " d_model"]:
    """``mean(positive) − mean(negative)`` (``"mean"``), or the first principal component of the
    paired differences ``d_i = positive_i − negative_i`` signed and scaled to the mean difference's
    projection on it (``"pca"``, repeng's pca_diff). float64 math, float32 result."""
    if positive.shape != negative.shape or positive.ndim != 2 or positive.shape[0] == 0:
        raise ValueError(
            f"need two [n, d_model] activation sets of one shape, got {tuple(positive.shape)} "
            f"and {tuple(negative.shape)}"
        )
    diffs = positive.double() - negative.double()
    mean = diffs.mean(0)
    if method == "mean":
        return mean.float()
    if method != "pca":
        raise ValueError(f"method must be 'mean' or 'pca', not {method!r}")
    if diffs.shape[0] < 2:
        raise ValueError("the first principal component needs at least 2 pairs")
    _, _, vh = torch.linalg.svd(diffs - mean, full_matrices=False)
    pc = vh[0]
    return (pc * (mean @ pc)).float()


def _check_layers(model: HookedModel, layers: Sequence[int]) -> tuple[int, ...]:
    chosen = tuple(int(layer) for layer in layers)
    n_layers = int(model.cfg.n_layers)
    if not chosen or any(not 0 <= layer < n_layers for layer in chosen):
        raise ValueError(f"layers must be a non-empty list within [0, {n_layers}), got {chosen}")
    return chosen


def compliance_vector(
    model: HookedModel,
    prompts: Sequence[str],
    layers: Sequence[int],
    *,
    comply: str = COMPLY_PREFIX,
    refuse: str = REFUSE_PREFIX,
    method: Method = "mean",
    batch_size: int = 16,
    progress: bool = False,
) -> ActAdd:
    """The "always comply" vector at ``blocks.{l}.hook_resid_pre``: activations of each prompt
    with the reply opened by ``comply`` vs by ``refuse``, averaged over the reply-prefix tokens,
    combined by :func:`paired_direction`. Adding it pushes replies from refusing to complying."""
    chosen = _check_layers(model, layers)
    prompts = list(prompts)
    acts = {}
    for name, prefix in (("comply", comply), ("refuse", refuse)):
        k = _reply_tokens(model, prompts, prefix)
        acts[name] = cache_activations(
            model,
            prompts,
            layers=chosen,
            positions=list(range(-k, 0)),
            assistant_prefix=prefix,
            batch_size=batch_size,
            progress=progress,
            desc=f"{name} activations",
        )
    rows = [
        paired_direction(acts["comply"][layer].mean(1), acts["refuse"][layer].mean(1), method)
        for layer in chosen
    ]
    return ActAdd(chosen, torch.stack(rows), RESID_PRE)


def json_vector(
    model: HookedModel,
    prompts: Sequence[str],
    layers: Sequence[int],
    *,
    suffix: str = JSON_SUFFIX,
    method: Method = "mean",
    batch_size: int = 16,
    progress: bool = False,
) -> ActAdd:
    """The "answer in JSON" vector at ``blocks.{l}.hook_resid_pre``: last-prompt-token
    activations of ``X + suffix`` minus those of ``X`` (:func:`paired_direction`)."""
    chosen = _check_layers(model, layers)
    plain = list(prompts)
    asked, base = (
        cache_activations(
            model, ps, layers=chosen, batch_size=batch_size, progress=progress, desc=desc
        )
        for ps, desc in (([p + suffix for p in plain], "json activations"), (plain, "plain"))
    )
    rows = [paired_direction(asked[layer], base[layer], method) for layer in chosen]
    return ActAdd(chosen, torch.stack(rows), RESID_PRE)


def vector_from_tensors(
    tensors: Mapping[str, Tensor],
    *,
    d_model: int | None = None,
    n_layers: int | None = None,
    layers: Sequence[int] | None = None,
    where: str = "vector",
) -> ActAdd:
    """An :class:`ActAdd` from per-layer tensors named ``blocks.{L}.hook_resid_pre``,
    ``blocks.{L}.hook_resid_post`` or ``direction.{L}`` (= resid_post), checked: 1-D float, finite,
    one ``d_model``, layers in range, one hook kind, and every layer in ``layers`` present
    (``layers`` also selects which to keep)."""
    found: dict[int, Tensor] = {}
    kinds: set[str] = set()
    for name, t in tensors.items():
        m = _HOOK_NAME.match(name) or _DIRECTION.match(name)
        if m is None:
            raise ValueError(
                f"{where}: unexpected tensor {name!r}; expected one 1-D [d_model] tensor per layer "
                "named 'blocks.{L}.hook_resid_pre', 'blocks.{L}.hook_resid_post' or 'direction.{L}'"
            )
        layer, kind = int(m.group(1)), m.group(2) if m.re is _HOOK_NAME else "post"
        kinds.add(kind)
        if not t.is_floating_point() or t.ndim != 1:
            raise ValueError(
                f"{where}: tensor {name!r} must be a 1-D float [d_model] tensor, got dtype "
                f"{t.dtype} and shape {tuple(t.shape)}"
            )
        if not torch.isfinite(t.float()).all():
            raise ValueError(f"{where}: tensor {name!r} contains NaN or inf")
        if layer in found:
            raise ValueError(f"{where}: layer {layer} appears twice")
        found[layer] = t.detach().float().cpu()
    if not found:
        raise ValueError(f"{where}: holds no steering tensors")
    if len(kinds) > 1:
        raise ValueError(f"{where}: mixes hook_resid_pre and hook_resid_post tensors; use one")
    widths = {int(t.shape[0]) for t in found.values()}
    if len(widths) > 1:
        raise ValueError(f"{where}: tensors have different lengths {sorted(widths)}")
    width = widths.pop()
    if d_model is not None and width != d_model:
        raise ValueError(f"{where}: vectors have d_model={width} but the model has {d_model}")
    if n_layers is not None and max(found) >= n_layers:
        raise ValueError(
            f"{where}: layer {max(found)} is out of range for a {n_layers}-layer model"
        )
    chosen = sorted(found) if layers is None else [int(layer) for layer in layers]
    missing = [layer for layer in chosen if layer not in found]
    if missing:
        raise ValueError(f"{where}: layers {missing} are missing (file has {sorted(found)})")
    template = RESID_PRE if kinds == {"pre"} else RESID_POST
    return ActAdd(tuple(chosen), torch.stack([found[layer] for layer in chosen]), template)


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from alphasteer_lens.storage import FORMAT, load_safetensors_checked, read_metadata

    try:
        ours = read_metadata(path).get("format") == FORMAT
        if ours:  # our own files carry a content hash: verify it
            return load_safetensors_checked(path)[0]
        return load_file(str(path))
    except ArtifactError:
        raise
    except (SafetensorError, OSError, ValueError, RuntimeError, OverflowError) as err:
        raise ArtifactError(f"{path} is not a readable safetensors file: {str(err)[:300]}") from err


# GGUF metadata value type -> size in bytes, for the fixed-size types
_GGUF_FIXED = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_GGUF_STRING, _GGUF_ARRAY, _GGUF_UINT32 = 8, 9, 4
_GGML_NAMES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 8: "Q8_0", 28: "F64", 30: "BF16"}


class _Cursor:
    """Bounds-checked little-endian reads from a GGUF file's bytes: every count is checked
    against the bytes left before anything is read or looped over, so a hostile header can
    neither hang the reader nor make it allocate more than the file's size."""

    def __init__(self, data: bytes, path: Path) -> None:
        self.data, self.pos, self.path = data, 0, path

    def fail(self, why: str) -> ArtifactError:
        return ArtifactError(f"{self.path} is not a readable GGUF file: {why}")

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise self.fail(f"truncated at byte {self.pos} (wanted {n} more bytes)")
        self.pos += n
        return self.data[self.pos - n : self.pos]

    def u32(self) -> int:
        return int(struct.unpack("<I", self.take(4))[0])

    def u64(self) -> int:
        return int(struct.unpack("<Q", self.take(8))[0])

    def count(self, min_size: int, what: str) -> int:
        n = self.u64()
        if n * min_size > len(self.data) - self.pos:
            raise self.fail(f"{what} count {n} does not fit in the file")
        return n

    def string(self) -> str:
        raw = self.take(self.count(1, "string length"))
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"a name at byte {self.pos - len(raw)} is not UTF-8") from None

    def value(self, gtype: int, depth: int = 0) -> object:
        if gtype in _GGUF_FIXED:
            return self.take(_GGUF_FIXED[gtype])
        if gtype == _GGUF_STRING:
            return self.string()
        if gtype == _GGUF_ARRAY and depth < 4:
            itype = self.u32()
            n = self.count(_GGUF_FIXED.get(itype, 8), "array")
            if itype in _GGUF_FIXED:
                return self.take(n * _GGUF_FIXED[itype])
            return [self.value(itype, depth + 1) for _ in range(n)]
        raise self.fail(f"unknown metadata value type {gtype} at byte {self.pos}")


def _read_gguf(path: Path) -> dict[str, Tensor]:
    """A GGUF control vector's ``direction.N`` tensors (little-endian GGUF v2/v3, F32 only).
    A small reader of our own, bounds-checked throughout: gguf's ``GGUFReader`` can loop for
    hours on an array length of 2⁶³ in a truncated file."""
    c = _Cursor(path.read_bytes(), path)
    if c.take(4) != GGUF_MAGIC:
        raise c.fail("bad magic")
    version = c.u32()
    if version not in (2, 3):
        raise c.fail(f"version {version} (big-endian or unsupported; expected 2 or 3)")
    n_tensors, n_kv = c.count(24, "tensor"), c.count(12, "metadata")
    meta: dict[str, tuple[int, object]] = {}
    for _ in range(n_kv):
        key = c.string()
        if key in meta:
            raise c.fail(f"metadata key {key[:80]!r} appears twice")
        gtype = c.u32()
        meta[key] = (gtype, c.value(gtype))
    gtype, arch = meta.get("general.architecture", (_GGUF_STRING, None))
    if gtype != _GGUF_STRING or arch != "controlvector":
        raise ArtifactError(
            f"{path}: GGUF general.architecture is {arch!r}, expected 'controlvector'"
        )
    infos = []
    for _ in range(n_tensors):
        name, n_dims = c.string(), c.u32()
        if not 1 <= n_dims <= 4:
            raise c.fail(f"tensor {name[:80]!r} has {n_dims} dimensions")
        dims = [c.u64() for _ in range(n_dims)]
        infos.append((name, dims, c.u32(), c.u64()))
    gtype, raw = meta.get("general.alignment", (_GGUF_UINT32, struct.pack("<I", 32)))
    alignment = (
        struct.unpack("<I", raw)[0] if gtype == _GGUF_UINT32 and isinstance(raw, bytes) else 0
    )
    if alignment == 0 or alignment & (alignment - 1):
        raise c.fail(f"general.alignment is not a power of two: {raw!r}")
    start = -(-c.pos // alignment) * alignment
    out: dict[str, Tensor] = {}
    for name, dims, ttype, offset in infos:
        if _DIRECTION.match(name) is None:
            raise ArtifactError(
                f"{path}: unexpected GGUF tensor {name[:80]!r} (expected direction.N)"
            )
        if ttype != 0:
            kind = _GGML_NAMES.get(ttype, f"type {ttype}")
            raise ArtifactError(f"{path}: tensor {name!r} is {kind}, expected F32")
        if name in out:
            raise c.fail(f"tensor {name!r} appears twice")
        n = math.prod(dims)
        begin, end = start + offset, start + offset + 4 * n
        if end > len(c.data):
            raise c.fail(f"tensor {name!r} ({n} floats at byte {begin}) runs past the end")
        values = np.frombuffer(c.data, dtype="<f4", count=n, offset=begin)
        out[name] = torch.from_numpy(
            values.astype(np.float32).reshape([int(d) for d in dims[::-1]])
        )
    return out


def check_embedded_fit(vector: ActAdd, where: str | Path = "vector") -> None:
    """Refuse a vector that cannot fit the embedded SmolLM2 (width, layers), from the model's
    known shape: before it and the prompt sets load (``alphasteer-lens audit --vector``)."""
    from alphasteer_lens.models import EMBEDDED_D_MODEL, EMBEDDED_N_LAYERS

    width = int(vector.vectors.shape[1])
    if width != EMBEDDED_D_MODEL:
        raise ArtifactError(
            f"{where}: vectors have d_model={width} but the embedded SmolLM2 has "
            f"d_model={EMBEDDED_D_MODEL}"
        )
    bad = [layer for layer in vector.layers if layer >= EMBEDDED_N_LAYERS]
    if bad:
        raise ArtifactError(
            f"{where}: layers {bad} out of range for the {EMBEDDED_N_LAYERS}-layer embedded model"
        )


def load_vector(
    path: str | Path,
    *,
    model: HookedModel | None = None,
    layers: Sequence[int] | None = None,
) -> ActAdd:
    """Load a steering vector from a safetensors file or a GGUF control vector (see the module
    docstring for the expected names and hooks), checked against ``model`` when given. Any
    problem with the file is an :class:`~alphasteer_lens.storage.ArtifactError` naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"steering vector file not found: {path}")
    try:
        return _load_vector(path, model, layers)
    except ArtifactError:
        raise
    except ValueError as err:
        raise ArtifactError(str(err)) from None


def _load_vector(path: Path, model: HookedModel | None, layers: Sequence[int] | None) -> ActAdd:
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == GGUF_MAGIC:
        tensors = _read_gguf(path)
    else:
        tensors = _read_safetensors(path)
        if {"vectors"} <= set(tensors):  # a save_steering artifact
            from alphasteer_lens.artifacts import load_steering

            steering = load_steering(path, model=model)
            if not isinstance(steering, ActAdd):
                raise ValueError(f"{path}: holds a {type(steering).__name__}, not an ActAdd")
            return steering
    d_model = int(model.cfg.d_model) if model is not None else None
    n_layers = int(model.cfg.n_layers) if model is not None else None
    return vector_from_tensors(
        tensors, d_model=d_model, n_layers=n_layers, layers=layers, where=str(path)
    )
