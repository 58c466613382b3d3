"""Steering at hook points: each steering is a function ``delta(h, state)``, and one runtime adds
them up.

Three interventions on the residual stream ``h`` at a hook point (row vectors):

- AlphaSteer: ``h + λ (h_last·w) r`` — ``h_last`` is this hook's activation at the last prompt
  token, so benign prompts (``h_last·w ≈ 0``) are left alone;
- ActAdd: ``h + λ v``;
- directional ablation: ``h − λ (h·r̂) r̂`` (Arditi et al.: every position, generated ones too).

:class:`SteeringRuntime` is told what each forward pass is (:mod:`alphasteer_lens.passes`),
computes every part's delta from the activation as it entered the hook point (so the parts of a
:class:`Composition` add up, in any order) in float32, and casts back, refusing a result the
activation's dtype cannot hold. :func:`steer` runs it around any TransformerLens forward pass or
``generate`` call, reading each pass from the tokens, attention mask and KV cache it is given.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from jaxtyping import Float
from torch import Tensor

from alphasteer_lens.alphasteer import AlphaSteer
from alphasteer_lens.hookpoints import RESID_PRE, check_template, hook_name
from alphasteer_lens.models import HookedModel, hook_names
from alphasteer_lens.passes import (
    PassReader,
    PassState,
    Prompt,
    SteerPositions,
    cache_length,
    check_steer_positions,
)

HookFn = Callable[[Tensor, Any], Tensor]


@dataclass(frozen=True)
class ActAdd:
    """Add a fixed vector per layer: ``h + λ v_l``."""

    layers: tuple[int, ...]
    vectors: Float[Tensor, "layer d_model"]
    hook_template: str = RESID_PRE
    default_positions: ClassVar[SteerPositions] = "prompt"

    def __post_init__(self) -> None:
        _check_vectors("ActAdd", self, "vectors")

    def hook_name(self, layer: int) -> str:
        return hook_name(self.hook_template, layer)

    def delta(self, i: int, h: Tensor, state: PassState) -> Tensor:
        return self.vectors[i].to(h.device, torch.float32)


@dataclass(frozen=True)
class DirectionalAblation:
    """Project a direction out of the residual stream: ``h − (h·r̂) r̂`` at every layer given,
    by default at every position, prompt and generated (Arditi et al.)."""

    layers: tuple[int, ...]
    directions: Float[Tensor, "layer d_model"]
    hook_template: str = RESID_PRE
    default_positions: ClassVar[SteerPositions] = "all"

    def __post_init__(self) -> None:
        _check_vectors("DirectionalAblation", self, "directions")
        if bool((self.directions.norm(dim=-1) == 0).any()):
            raise ValueError("DirectionalAblation: a direction is the zero vector")

    def hook_name(self, layer: int) -> str:
        return hook_name(self.hook_template, layer)

    def delta(self, i: int, h: Tensor, state: PassState) -> Tensor:
        r = self.directions[i].to(h.device, torch.float32)
        r_hat = r / r.norm()
        return -(h @ r_hat).unsqueeze(-1) * r_hat


Steering = AlphaSteer | ActAdd | DirectionalAblation


@dataclass(frozen=True)
class Composition:
    """Several steerings at once, ``parts[i] = (steering, λ_i)``; the strength they are applied
    with multiplies every ``λ_i``. Every part reads the activation as it entered the hook point,
    so the deltas add up and the order of the parts does not matter. The audit steers a benign
    vector and AlphaSteer together this way."""

    parts: tuple[tuple[Any, float], ...]

    def __post_init__(self) -> None:
        parts = tuple((s, check_strength(lam)) for s, lam in self.parts)
        for s, _ in parts:
            if isinstance(s, Composition) or not callable(getattr(s, "delta", None)):
                raise ValueError(f"Composition parts must be steerings, got {type(s).__name__}")
        if not parts:
            raise ValueError("Composition needs at least one part")
        object.__setattr__(self, "parts", parts)

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(sorted({layer for s, _ in self.parts for layer in s.layers}))


AnySteering = Steering | Composition | Any


def _check_vectors(kind: str, steering: Any, name: str) -> None:
    vectors = getattr(steering, name)
    layers = tuple(steering.layers)
    if not isinstance(vectors, Tensor) or vectors.ndim != 2 or vectors.shape[0] != len(layers):
        shape = tuple(vectors.shape) if isinstance(vectors, Tensor) else type(vectors).__name__
        raise ValueError(
            f"{kind}: {name} must be [n_layers, d_model] with one row per layer; got "
            f"{shape} for {len(layers)} layers"
        )
    if not torch.isfinite(vectors).all():
        raise ValueError(f"{kind}: {name} contain NaN or inf")
    if not torch.isfinite(vectors.detach().float()).all():
        raise ValueError(f"{kind}: {name} overflow float32 (largest |value| {vectors.abs().max()})")
    bad = [x for x in layers if not isinstance(x, int) or isinstance(x, bool) or x < 0]
    if len(set(layers)) != len(layers) or bad:
        raise ValueError(f"{kind}: layers must be unique non-negative ints, got {list(layers)}")
    check_template(steering.hook_template)


def check_strength(strength: float) -> float:
    if isinstance(strength, bool) or not isinstance(strength, (int, float)):
        raise ValueError(f"steering strength must be a number, got {strength!r}")
    strength = float(strength)
    if not math.isfinite(strength):
        raise ValueError(f"steering strength must be finite, got {strength}")
    return strength


def _strengths(strength: float | Sequence[float]) -> Tensor:
    if isinstance(strength, (int, float, str)) or not isinstance(strength, Sequence):
        values = [check_strength(strength)]
    else:
        values = [check_strength(s) for s in strength]
        if not values:
            raise ValueError("per-row strengths are empty")
    lam = torch.tensor(values, dtype=torch.float64)
    if not torch.isfinite(lam.float()).all():
        raise ValueError(f"steering strength {max(values, key=abs)} overflows float32")
    return lam.float()


def _vectors(steering: Any) -> Tensor | None:
    for name in ("vectors", "directions", "r"):
        v = getattr(steering, name, None)
        if isinstance(v, Tensor):
            return v
    return None


@dataclass(frozen=True)
class _Entry:
    steering: Any
    index: int
    strength: Tensor  # [1] or one per row, float32
    positions: SteerPositions
    generated: bool


class SteeringRuntime:
    """Adds the deltas of one steering (or a :class:`Composition`) at its hook points.

    ``begin_pass(tokens, attention_mask, cached=...)`` is called before each forward pass (what
    :func:`steer` and :mod:`alphasteer_lens.deploy` do); ``apply(hook_name, act)`` then returns
    ``act + Σ mask · λ · delta`` for the parts at that hook. ``prompt`` tells the runtime where the
    prompt lies (generation and caching know); without it each prefill's prompt is read from its
    attention mask or pad tokens. ``positions=None`` lets every part use its own default.
    """

    def __init__(
        self,
        steering: AnySteering,
        strength: float | Sequence[float] = 1.0,
        *,
        positions: SteerPositions | None = None,
        generated: bool = False,
        d_model: int | None = None,
        dtype: torch.dtype | None = None,
        prompt: Prompt | None = None,
        pad_id: int | None = None,
        padding_side: str = "left",
        instruction_end: Tensor | None = None,
        bos_id: int | None = None,
    ) -> None:
        lam = _strengths(strength)
        parts = steering.parts if isinstance(steering, Composition) else ((steering, 1.0),)
        self.entries: dict[str, list[_Entry]] = {}
        for part, lam_i in parts:
            if not callable(getattr(part, "delta", None)):
                raise ValueError(f"{type(part).__name__} is not a steering (it has no delta)")
            pos = check_steer_positions(positions or part.default_positions)
            vectors = _vectors(part)
            if d_model is not None and vectors is not None and vectors.shape[-1] != d_model:
                raise ValueError(
                    f"steering vectors have d_model={vectors.shape[-1]} but the model has "
                    f"d_model={d_model}"
                )
            scaled = lam * float(lam_i)
            if vectors is not None and dtype is not None:
                _check_representable(scaled, vectors, dtype, type(part).__name__)
            for i, layer in enumerate(part.layers):
                entry = _Entry(part, i, scaled, pos, generated)
                self.entries.setdefault(part.hook_name(layer), []).append(entry)
        self.reader = PassReader(
            told=prompt,
            pad_id=pad_id,
            padding_side=padding_side,
            instruction_end=instruction_end,
            bos_id=bos_id,
        )

    def hook_names(self) -> list[str]:
        return list(self.entries)

    @property
    def state(self) -> PassState | None:
        return self.reader.state

    def begin_pass(
        self,
        tokens: Tensor,
        attention_mask: Tensor | None = None,
        *,
        cached: bool = False,
        padding_side: str | None = None,
    ) -> PassState:
        """Classify the coming forward pass (see :class:`~alphasteer_lens.passes.PassReader`)."""
        return self.reader.begin(tokens, attention_mask, cached=cached, padding_side=padding_side)

    def apply(self, name: str, act: Tensor) -> Tensor:
        state = self.reader.state
        if state is None:
            raise RuntimeError(
                f"steering at {name} ran before the runtime was told of a forward pass; use "
                "steer(...) or call begin_pass(tokens, ...) first"
            )
        if act.ndim != 3 or act.shape[1] != state.width or act.shape[0] != state.prompt.batch:
            raise ValueError(
                f"steering at {name}: activation of shape {tuple(act.shape)} does not match the "
                f"{state.kind} pass of {state.prompt.batch} rows × {state.width} positions"
            )
        h = act.float()
        total: Tensor | None = None
        for e in self.entries[name]:
            mask = state.mask(e.positions, e.generated, act.device)
            steered = bool(mask.any())
            if not steered and state.kind == "decode":
                continue
            delta = e.steering.delta(e.index, h, state)  # prefills always run it: it may memo
            if not steered:
                continue
            lam = e.strength.to(act.device)
            if lam.numel() not in (1, act.shape[0]):
                raise ValueError(f"{lam.numel()} per-row strengths for a batch of {act.shape[0]}")
            term = (mask.unsqueeze(-1) * lam.reshape(-1, 1, 1)) * delta
            total = term if total is None else total + term
        if total is None:
            return act
        out = (h + total).to(act.dtype)
        if not bool(torch.isfinite(out).all()) and bool(torch.isfinite(act).all()):
            raise ValueError(
                f"steering at {name} overflowed {act.dtype} (largest |change| "
                f"{float(total.abs().max()):.3g}): lower the strength or use a wider dtype"
            )
        return out

    def tl_hooks(self) -> list[tuple[str, HookFn]]:
        """``(hook_name, fn)`` pairs for TransformerLens ``model.hooks(fwd_hooks=...)``."""
        return [(name, self._hook_fn(name)) for name in self.entries]

    def _hook_fn(self, name: str) -> HookFn:
        def fn(act: Tensor, hook: Any) -> Tensor:
            return self.apply(name, act)

        return fn


def _check_representable(lam: Tensor, vectors: Tensor, dtype: torch.dtype, kind: str) -> None:
    """Refuse a strength × vector product the model's dtype cannot hold."""
    if not dtype.is_floating_point:
        return
    biggest = float(lam.abs().max().double()) * float(vectors.detach().abs().max().double())
    limit = float(torch.finfo(dtype).max)
    if not math.isfinite(biggest) or biggest >= limit:
        raise ValueError(
            f"{kind}: strength {float(lam.abs().max()):.3g} × vector entries up to "
            f"{float(vectors.abs().max()):.3g} = {biggest:.3g} cannot be represented in {dtype} "
            f"(max {limit:.3g})"
        )


_TOKEN_KEYS = ("input", "input_ids", "tokens")
_CACHE_KEYS = ("past_kv_cache", "past_key_values")


def _begin(
    runtime: SteeringRuntime, model: HookedModel, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    """Tell the runtime about one forward call, from its token ids (or, for a pass fed
    embeddings at ``start_at_layer=0`` as TL 3.x's ``generate`` does, their shape)."""
    x = args[0] if args else next((kwargs[k] for k in _TOKEN_KEYS if k in kwargs), None)
    if isinstance(x, (str, list)):
        x = model.to_tokens(
            x, prepend_bos=kwargs.get("prepend_bos"), padding_side=kwargs.get("padding_side")
        )
    cached = any(cache_length(kwargs.get(k)) > 0 for k in _CACHE_KEYS)
    mask, side = kwargs.get("attention_mask"), kwargs.get("padding_side")
    if isinstance(x, Tensor) and not x.is_floating_point():
        tokens = x.unsqueeze(0) if x.ndim == 1 else x
        runtime.begin_pass(tokens, mask, cached=cached, padding_side=side)
    elif isinstance(x, Tensor) and x.ndim == 3 and kwargs.get("start_at_layer") == 0:
        shape = (int(x.shape[0]), int(x.shape[1]))
        runtime.reader.begin(None, mask, cached=cached, padding_side=side, shape=shape)
    else:
        raise ValueError(
            "steer(...) reads each forward pass from its token ids; this pass was called with "
            f"{type(x).__name__} from a later layer (start_at_layer=...), which it cannot place"
        )


def _patch(model: HookedModel, name: str, make: Callable[[Any], Any]) -> Callable[[], None]:
    had = name in vars(model)
    inner = getattr(model, name)
    setattr(model, name, make(inner))

    def restore() -> None:
        if had:
            setattr(model, name, inner)
        else:
            delattr(model, name)

    return restore


@contextmanager
def _reading_passes(model: HookedModel, runtime: SteeringRuntime) -> Iterator[None]:
    """Wrap ``model.forward`` (the instance attribute, which both TransformerLens classes'
    ``__call__`` and ``generate`` go through) so that every pass is told to the runtime, and
    ``model.generate`` so that a generation's passes are known to belong to it."""

    def forward(inner: Any) -> Any:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            _begin(runtime, model, args, kwargs)
            return inner(*args, **kwargs)

        return wrapped

    def generate(inner: Any) -> Any:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            with runtime.reader.generation():
                return inner(*args, **kwargs)

        return wrapped

    restores = [_patch(model, "forward", forward), _patch(model, "generate", generate)]
    try:
        yield
    finally:
        for restore in reversed(restores):
            restore()


def _prepended_bos(model: HookedModel) -> int | None:
    """The BOS id TransformerLens prepends to this model's prompts, or None."""
    if not getattr(model.cfg, "default_prepend_bos", True):
        return None
    bos = getattr(model.tokenizer, "bos_token_id", None)
    return bos if isinstance(bos, int) else None


def _padding_side(model: HookedModel) -> str:
    side = getattr(model.cfg, "default_padding_side", None)
    side = side or getattr(model.tokenizer, "padding_side", None) or "right"
    return str(side)


@contextmanager
def steer(
    model: HookedModel,
    steering: AnySteering,
    strength: float | Sequence[float] = 1.0,
    *,
    positions: SteerPositions | None = None,
    generated: bool = False,
    prompt: Prompt | None = None,
    instruction_end: Tensor | None = None,
    padding_side: str | None = None,
) -> Iterator[HookedModel]:
    """Context manager: inside it, every forward pass and ``generate`` call is steered.

    Each pass is read from what it is called with: a KV cache means a decode step, tokens that
    extend the previous pass a re-run, anything else a new prompt, whose rows end at the last 1
    of the attention mask or before the pad run on ``padding_side`` (default: the model's, as
    ``model.to_tokens`` pads). ``prompt`` tells it instead (generation does)."""
    n_layers = int(model.cfg.n_layers)
    for layer in steering.layers:
        if layer >= n_layers:
            raise ValueError(
                f"steering layer {layer} is out of range: the model has {n_layers} layers"
            )
    runtime = SteeringRuntime(
        steering,
        strength,
        positions=positions,
        generated=generated,
        d_model=int(model.cfg.d_model),
        dtype=getattr(model.cfg, "dtype", None),
        prompt=prompt,
        pad_id=getattr(model.tokenizer, "pad_token_id", None),
        padding_side=padding_side or _padding_side(model),
        instruction_end=instruction_end,
        bos_id=_prepended_bos(model),
    )
    known = hook_names(model)
    for name in runtime.hook_names():
        if known and name not in known:
            raise ValueError(f"hook {name!r} does not exist on this model")
    with _reading_passes(model, runtime), model.hooks(fwd_hooks=runtime.tl_hooks()):
        yield model
