"""Batched activation caching at hook points, with an on-disk cache keyed by content hashes.

Activations are read at ``blocks.{l}.hook_resid_pre`` (any hook name works) for chat-formatted
prompts, at the last prompt token by default. The forward pass stops after the last requested
layer and never reaches the unembedding; prompts are batched by token length to keep padding
small. Results equal Hugging Face's ``output_hidden_states`` for the same tokens, mask and
position ids.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from alphasteer_lens.chat import (
    MAX_BATCH_TOKENS,
    check_prompts,
    encode_chat,
    encode_texts,
    length_batches,
    model_format,
)
from alphasteer_lens.formats import PromptFormat
from alphasteer_lens.hookpoints import RESID_PRE, hook_name, layer_of
from alphasteer_lens.models import HookedModel, hook_names, model_name
from alphasteer_lens.passes import Positions
from alphasteer_lens.sources import cache_dir
from alphasteer_lens.storage import atomic_save_safetensors, load_safetensors_checked

__all__ = ["RESID_PRE", "Activations", "Positions", "cache_activations", "last_token", "layer_of"]
_LAYER = re.compile(r"^blocks\.(\d+)\.")


def last_token(h: Tensor) -> Tensor:
    """The last-token rows of cached activations: ``h`` itself for ``[n, d]``, ``h[:, 0]`` for
    the ``[n, 2, d]`` (last token, prompt mean) of ``cache_activations(positions="last+mean")``.
    A bare tensor does not say how it was cached: two explicit positions (``positions=[-2, -1]``)
    have the same shape, so pass only "last" or "last+mean" caches here, or call
    :meth:`Activations.last_token`, which checks."""
    if h.ndim == 3 and h.shape[1] == 2:
        return h[:, 0]
    if h.ndim != 2:
        raise ValueError(
            f"activations must be [n, d] (last token) or [n, 2, d] (last token, prompt mean), "
            f"got shape {tuple(h.shape)}"
        )
    return h


@dataclass(frozen=True)
class Activations(Mapping[str, Tensor]):
    """Activations per hook name, a read-only mapping: ``[n, d]`` for "last"/"mean",
    ``[n, 2, d]`` (last token, prompt mean) for "last+mean", ``[n, len(positions), d]`` for a
    position list, ``[n, pos, d]`` (left-padded, see
    ``attention_mask``) for "prompt"/"all". ``acts[layer]`` also works where one hook of that
    layer is cached; ``len(acts)`` is the number of hooks and ``acts.n`` the number of prompts."""

    tensors: dict[str, Float[Tensor, "n ..."]]
    positions: str | tuple[int, ...]
    attention_mask: Tensor | None = None
    meta: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.tensors:
            raise ValueError("Activations hold no hooks")
        rows = {int(t.shape[0]) for t in self.tensors.values()}
        if len(rows) != 1:
            raise ValueError(f"Activations: hooks hold different numbers of prompts {sorted(rows)}")
        object.__setattr__(self, "tensors", MappingProxyType(dict(self.tensors)))

    def __getitem__(self, key: int | str) -> Tensor:
        if isinstance(key, int) and not isinstance(key, bool):
            matches = [n for n in self.tensors if layer_of(n) == key]
            if not matches:
                raise KeyError(f"layer {key} not cached (hooks: {sorted(self.tensors)})")
            if len(matches) > 1:
                raise KeyError(
                    f"layer {key} is ambiguous: {sorted(matches)} are cached; index by hook name"
                )
            return self.tensors[matches[0]]
        if key not in self.tensors:
            raise KeyError(f"hook {key!r} not cached (hooks: {sorted(self.tensors)})")
        return self.tensors[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    @property
    def n(self) -> int:
        """Number of prompts."""
        return int(next(iter(self.tensors.values())).shape[0])

    def by_layer(self) -> dict[int, Tensor]:
        """``{layer: tensor}``; an error if a layer has several cached hooks."""
        out: dict[int, Tensor] = {}
        for name, t in self.tensors.items():
            layer = layer_of(name)
            if layer in out:
                raise ValueError(
                    f"layer {layer} has several cached hooks ({sorted(self.tensors)}); "
                    "index by hook name instead of by_layer()"
                )
            out[layer] = t
        return out

    def select(self, rows: Sequence[int]) -> Activations:
        """The activations of the prompts at ``rows`` (in that order), e.g. a length-matched
        subset from :meth:`~alphasteer_lens.prompts.PromptSet.length_matched_indices`."""
        n = self.n
        bad = [i for i in rows if not -n <= i < n]
        if not rows or bad:
            raise ValueError(
                f"rows must be a non-empty list of indices in [-{n}, {n}); bad: {bad[:5]}"
            )
        idx = torch.as_tensor(list(rows), dtype=torch.long)
        mask = None if self.attention_mask is None else self.attention_mask[idx]
        return replace(
            self, tensors={k: t[idx] for k, t in self.tensors.items()}, attention_mask=mask
        )

    def last_token(self) -> Activations:
        """The last-token view (``[n, d]`` per hook) of "last" or "last+mean" activations."""
        if self.positions == "last":
            return self
        if self.positions != "last+mean":
            raise ValueError(
                "last_token() needs activations cached with positions 'last' or 'last+mean'; "
                f"these hold {self.positions!r}"
            )
        tensors = {k: last_token(t) for k, t in self.tensors.items()}
        return replace(self, tensors=tensors, positions="last")

    @classmethod
    def from_cache(
        cls,
        cache: Mapping[str, Tensor],
        *,
        hooks: Sequence[str] | None = None,
        position: int = -1,
    ) -> Activations:
        """From a TransformerLens ``ActivationCache`` (or any ``{hook: [batch, pos, d]}``), each
        hook sliced at ``position`` (default the last column: the last prompt token of a
        left-padded batch; for right padding pass the ``positions`` you need to a cache run)."""
        names = list(hooks) if hooks is not None else [n for n in cache if _LAYER.match(n)]
        tensors: dict[str, Tensor] = {}
        for name in names:
            t = cache[name]
            if t.ndim != 3:
                raise ValueError(f"{name}: expected [batch, pos, d], got {tuple(t.shape)}")
            tensors[name] = t[:, position].detach().float().cpu()
        return cls(tensors, (position,), None, {"source": "ActivationCache"})


def layer_tensors(source: Mapping[Any, Tensor], *, position: int = -1) -> dict[int, Tensor]:
    """``{layer: [n, d]}`` from :class:`Activations`, a TransformerLens ``ActivationCache`` (sliced
    at ``position``) or a mapping that already is ``{layer: tensor}``."""
    if isinstance(source, Activations):
        return source.by_layer()
    keys = list(source.keys())
    if keys and all(isinstance(k, str) for k in keys):
        return Activations.from_cache(source, position=position).by_layer()
    return dict(source)


def resolve_hooks(
    model: HookedModel,
    layers: Sequence[int] | None = None,
    hooks: Sequence[str] | None = None,
    template: str = RESID_PRE,
) -> list[str]:
    """Hook names for ``layers`` (or the given ``hooks``), checked against the model."""
    n_layers = int(model.cfg.n_layers)
    if hooks is None:
        if layers is None:
            layers = range(n_layers)
        for layer in layers:
            if not isinstance(layer, int) or isinstance(layer, bool):
                raise ValueError(f"layer must be an int, got {layer!r}")
            if not 0 <= layer < n_layers:
                raise ValueError(f"layer {layer} is out of range: the model has {n_layers} layers")
        hooks = [hook_name(template, layer) for layer in layers]
    known = hook_names(model)
    for name in hooks:
        if known and name not in known:
            close = sorted(n for n in known if n.endswith(name.rsplit(".", 1)[-1]))[:3]
            raise ValueError(f"unknown hook name {name!r} (similar: {close})")
    if len(set(hooks)) != len(hooks):
        raise ValueError(f"duplicate hooks requested: {list(hooks)}")
    return list(hooks)


def _select(act: Tensor, mask: Tensor, positions: str | tuple[int, ...]) -> Tensor:
    if positions == "last":
        return act[:, -1]
    if positions == "all":
        return act
    if positions in ("mean", "last+mean"):
        m = mask.to(act.dtype).unsqueeze(-1)
        mean = (act * m).sum(1) / m.sum(1)
        return mean if positions == "mean" else torch.stack([act[:, -1], mean], 1)
    assert isinstance(positions, tuple)
    start = mask.shape[1] - mask.sum(1)  # first real token per row
    idx = torch.stack(
        [torch.where(torch.tensor(p) < 0, mask.shape[1] + p, start + p) for p in positions], dim=1
    )
    if (idx < start.unsqueeze(1)).any() or (idx >= mask.shape[1]).any():
        raise ValueError(f"positions {positions} fall outside a prompt in this batch")
    return act[torch.arange(act.shape[0]).unsqueeze(1), idx]


def _weights_fingerprint(model: HookedModel) -> str:
    """Name, shape, dtype and exact float64 sum and sum of squares of every parameter: two models
    of one architecture but different weights (another seed, a fine-tune) get different keys.
    Parameters offloaded to the meta device count by name and shape only."""
    h = hashlib.sha256()
    named = model.named_parameters() if hasattr(model, "named_parameters") else []
    for name, p in named:
        h.update(f"{name}|{tuple(p.shape)}|{p.dtype}|".encode())
        if p.device.type != "meta" and p.numel():
            x = p.detach().double()
            h.update(f"{float(x.sum()).hex()}|{float((x * x).sum()).hex()}|".encode())
    return h.hexdigest()


def _tokenizer_fingerprint(tokenizer: Any) -> str:
    """Chat template, special token ids and vocabulary: what turns a prompt into token ids."""
    h = hashlib.sha256()
    specials = [
        getattr(tokenizer, a, None) for a in ("bos_token_id", "eos_token_id", "pad_token_id")
    ]
    h.update(f"{getattr(tokenizer, 'chat_template', None)}|{specials}|".encode())
    if hasattr(tokenizer, "get_vocab"):
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    return h.hexdigest()


def cache_key(
    model: HookedModel, prompts: Sequence[str], hooks: Sequence[str], positions: Any, extra: str
) -> str:
    """Content hash of everything that determines the activations: the model's name, weights and
    tokenizer, the prompts, hooks and positions, and ``extra`` (system prompt, assistant prefix)."""
    h = hashlib.sha256()
    parts = (
        model_name(model),
        _weights_fingerprint(model),
        _tokenizer_fingerprint(model.tokenizer),
        json.dumps(list(hooks)),
        str(positions),
        extra,
    )
    for part in parts:
        h.update(part.encode())
        h.update(b"\0")
    for p in prompts:
        h.update(len(p).to_bytes(8, "little"))
        h.update(p.encode())
    return h.hexdigest()[:32]


def _free_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux ``MemAvailable``, which counts
    reclaimable page cache; else free pages), or None when unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _free_disk(directory: Path) -> int:
    return shutil.disk_usage(directory).free


def _check_resources(n: int, width: int, d: int, n_hooks: int, target: Path | None) -> None:
    """Refuse, before any forward pass, a request whose float32 result would not fit in free
    memory (or, with a disk cache, on that disk)."""
    need = n * width * d * n_hooks * 4
    avail = _free_memory()
    if avail is not None and need > avail:
        raise MemoryError(
            f"the requested activations need {need / 2**30:.1f} GiB but only "
            f"{avail / 2**30:.1f} GiB of memory is free; ask for fewer layers, fewer positions "
            "('last' instead of 'all') or fewer prompts"
        )
    if target is not None:
        free = _free_disk(target)
        if need > free:
            raise OSError(
                f"the activation cache needs {need / 2**30:.1f} GiB on disk but {target} has "
                f"{free / 2**30:.1f} GiB free; pass cache=False or free space"
            )


def _attached_hooks(model: HookedModel) -> list[str]:
    """Hook points that currently hold forward hooks (e.g. inside ``steer(...)``)."""
    points = getattr(model, "hook_dict", {})
    return sorted(n for n, hp in points.items() if getattr(hp, "fwd_hooks", None))


@torch.no_grad()
def cache_activations(
    model: HookedModel,
    prompts: Sequence[str],
    *,
    layers: Sequence[int] | None = None,
    hooks: Sequence[str] | None = None,
    positions: Positions = "last",
    batch_size: int = 16,
    system: str | None = None,
    assistant_prefix: str = "",
    prompt_format: PromptFormat | str | None = None,
    cache: bool | str | Path = False,
    progress: bool = True,
    desc: str = "caching activations",
) -> Activations:
    """Run ``prompts`` through ``model`` and keep the activations at ``hooks``.

    ``prompt_format`` defaults to the chat template when the tokenizer has one, raw text
    otherwise. ``cache=True`` (or a directory) stores the result as safetensors under a key made
    of the model, prompts, hooks, positions and format, so a changed prompt set never reuses
    stale activations; a stored file that does not match the request is recomputed. Non-finite
    activations raise an error naming the hook and prompts. Prompts run in batches of similar
    token length, at most ``batch_size`` rows and :data:`~alphasteer_lens.chat.MAX_BATCH_TOKENS`
    padded tokens each; the result is in the given order.
    """
    prompts = check_prompts(prompts, batch_size)
    names = resolve_hooks(model, layers, hooks)
    if not names:
        raise ValueError("no layers or hooks requested: pass layers=[...] or hooks=[...]")
    pos: str | tuple[int, ...] = positions if isinstance(positions, str) else tuple(positions)
    if pos == "prompt":
        pos = "all"
    if isinstance(pos, str) and pos not in ("last", "all", "mean", "last+mean"):
        raise ValueError(
            f"positions must be 'last', 'prompt', 'mean', 'last+mean' or a list of ints, got "
            f"{pos!r}"
        )
    if isinstance(pos, tuple) and not pos:
        raise ValueError("positions list is empty")
    if isinstance(pos, tuple) and any(not isinstance(p, int) or isinstance(p, bool) for p in pos):
        raise ValueError(f"positions list must hold ints, got {list(pos)}")
    fmt = model_format(model, prompt_format, system, assistant_prefix)
    extra = json.dumps(fmt.to_json(), sort_keys=True)
    path: Path | None = None
    attached = _attached_hooks(model) if cache is not False else []
    if attached:
        warnings.warn(
            f"hooks are attached to the model at {attached[:3]} (e.g. inside steer(...)); the "
            "on-disk activation cache is skipped so that steered activations are never stored "
            "or read under the key of unsteered ones",
            stacklevel=2,
        )
    elif cache is not False:
        root = cache_dir() / "activations" if cache is True else Path(cache)
        root.mkdir(parents=True, exist_ok=True)
        path = root / f"{cache_key(model, prompts, names, pos, extra)}.safetensors"
        if path.exists():
            try:
                tensors, meta = load_safetensors_checked(path)
            except ValueError as err:
                warnings.warn(f"recomputing an unreadable activation cache: {err}", stacklevel=2)
            else:
                mask = tensors.pop("__attention_mask__", None)
                problem = _cache_mismatch(tensors, mask, names, pos, len(prompts), model)
                if problem is None:
                    return Activations(tensors, pos, mask, meta)
                warnings.warn(f"recomputing activation cache {path.name}: {problem}", stacklevel=2)
    stop = max(layer_of(n) for n in names) + 1
    lengths = [len(p) for p in prompts]  # characters: sizes the per-prompt position budget
    # Batches of similar token length under a padded-token budget: a batch of 32 long
    # jailbreak templates padded to 1,000 tokens spends most of its time on [batch, heads,
    # pos, pos] attention tensors, and one long prompt would pad thirty-one short ones.
    tokens = [len(ids) for ids in encode_texts(model, prompts, fmt)[1]]
    batches = length_batches(tokens, batch_size, MAX_BATCH_TOKENS)
    order = [i for b in batches for i in b]
    d_model = int(model.cfg.d_model)
    if isinstance(pos, tuple):
        width = len(pos)
    else:
        width = {"last": 1, "mean": 1, "last+mean": 2}.get(pos, 64 + max(lengths) // 3)
    _check_resources(len(prompts), width, d_model, len(names), path.parent if path else None)
    out: dict[str, list[Tensor]] = {n: [] for n in names}
    masks: list[Tensor] = []
    for batch_idx in tqdm(batches, desc=desc, disable=not progress, leave=False):
        batch = encode_chat(model, [prompts[i] for i in batch_idx], prompt_format=fmt).to(
            model.cfg.device
        )
        grabbed: dict[str, Tensor] = {}
        grab = partial(_grab, store=grabbed, mask=batch.attention_mask, positions=pos)
        model.run_with_hooks(
            batch.tokens,
            attention_mask=batch.attention_mask,
            fwd_hooks=[(n, partial(grab, name=n)) for n in names],
            stop_at_layer=stop if stop < int(model.cfg.n_layers) else None,
            return_type=None,
        )
        for n in names:
            _check_finite(grabbed[n], n, [prompts[i] for i in batch_idx], batch_idx)
            out[n].append(grabbed[n])
        if pos == "all":
            masks.append(batch.attention_mask.cpu())
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(len(order))
    mask_all: Tensor | None = None
    if pos == "all":
        width_all = max(m.shape[1] for m in masks)
        mask_all = torch.cat([_left_pad(m, width_all) for m in masks])[inverse]
        tensors = {n: torch.cat([_left_pad(t, width_all) for t in out[n]])[inverse] for n in names}
    else:
        tensors = {n: torch.cat(out[n])[inverse] for n in names}
    meta = {
        "model": model_name(model),
        "hooks": json.dumps(names),
        "positions": str(pos),
        "prompt_format": extra,
        "n_prompts": str(len(prompts)),
    }
    if path is not None:
        to_save = dict(tensors)
        if mask_all is not None:
            to_save["__attention_mask__"] = mask_all
        atomic_save_safetensors(to_save, path, meta)
    return Activations(tensors, pos, mask_all, meta)


def _cache_mismatch(
    tensors: dict[str, Tensor],
    mask: Tensor | None,
    names: Sequence[str],
    pos: str | tuple[int, ...],
    n: int,
    model: HookedModel,
) -> str | None:
    """Why a stored cache file does not answer this request (None if it does)."""
    if sorted(tensors) != sorted(names):
        return f"it holds hooks {sorted(tensors)[:4]}, not {sorted(names)[:4]}"
    d = int(model.cfg.d_model)
    for name, t in tensors.items():
        if t.shape[0] != n or t.shape[-1] != d:
            return f"{name} has shape {tuple(t.shape)} for {n} prompts of d_model={d}"
        if t.dtype != torch.float32 or not bool(torch.isfinite(t).all()):
            return f"{name} is not finite float32"
        if isinstance(pos, str) and pos in ("last", "mean") and t.ndim != 2:
            return f"{name} has shape {tuple(t.shape)} for positions={pos!r}"
        if pos == "last+mean" and (t.ndim != 3 or t.shape[1] != 2):
            return f"{name} has shape {tuple(t.shape)} for positions='last+mean'"
        if isinstance(pos, tuple) and (t.ndim != 3 or t.shape[1] != len(pos)):
            return f"{name} has shape {tuple(t.shape)} for positions={list(pos)}"
        if pos == "all" and (t.ndim != 3 or mask is None or tuple(mask.shape) != t.shape[:2]):
            return f"{name} has no matching attention mask for positions='prompt'"
    return None


def _check_finite(t: Tensor, hook: str, texts: list[str], indices: list[int]) -> None:
    """Stop at the first batch whose activations are not finite, naming hook and prompts."""
    bad = (~torch.isfinite(t).reshape(t.shape[0], -1).all(1)).nonzero().flatten().tolist()
    if bad:
        rows = sorted(indices[r] for r in bad)
        first = texts[bad[0]]
        raise ValueError(
            f"activations at {hook} contain NaN or inf for prompts {rows[:10]} (e.g. prompt "
            f"{indices[bad[0]]}: {first[:60]!r}); check the dtype (float16 overflows), the "
            "weights and any hooks attached to the model"
        )


def _grab(
    act: Tensor,
    hook: Any,
    *,
    name: str,
    store: dict[str, Tensor],
    mask: Tensor,
    positions: str | tuple[int, ...],
) -> Tensor:
    """Hook: keep the selected positions of ``act`` (on the CPU, float32) under ``name``."""
    store[name] = _select(act, mask, positions).detach().float().cpu()
    return act


def _left_pad(t: Tensor, width: int) -> Tensor:
    pad = width - t.shape[1]
    if pad == 0:
        return t
    shape = (t.shape[0], pad, *t.shape[2:])
    return torch.cat([torch.zeros(shape, dtype=t.dtype), t], dim=1)
