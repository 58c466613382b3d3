"""Apply steering through TransformerLens hook points, while running or generating.

Three interventions on the residual stream ``h`` at a hook point (row vectors):

- AlphaSteer: ``h + λ (h_last·w) r`` — ``h_last`` is this hook's activation at the last prompt
  token, so benign prompts (``h_last·w ≈ 0``) are left alone;
- ActAdd: ``h + λ v``;
- directional ablation: ``h − (h·r̂) r̂`` (λ scales the removed part).

Which positions are steered is a :class:`Positions` choice. During generation the prompt is
steered in the prefill pass only (the reference AlphaSteer behaviour): with a KV cache the decode
steps are not steered again, and without one each full re-run steers only the prompt positions,
so both give the same tokens. ``generated=True`` also steers the generated tokens (SCANS).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from alphasteer_lens.activations import RESID_PRE
from alphasteer_lens.alphasteer import AlphaSteer
from alphasteer_lens.models import HookedModel, hook_names

Positions = Literal["prompt", "last", "instruction_end"]
HookFn = Callable[[Tensor, Any], Tensor]


@dataclass(frozen=True)
class ActAdd:
    """Add a fixed vector per layer: ``h + λ v_l``."""

    layers: tuple[int, ...]
    vectors: Float[Tensor, "layer d_model"]
    hook_template: str = RESID_PRE

    def __post_init__(self) -> None:
        _check_vectors("ActAdd", self.layers, self.vectors)

    def hook_name(self, layer: int) -> str:
        return self.hook_template.format(layer=layer)


@dataclass(frozen=True)
class DirectionalAblation:
    """Project a direction out of the residual stream: ``h − (h·r̂) r̂`` at every layer given."""

    layers: tuple[int, ...]
    directions: Float[Tensor, "layer d_model"]
    hook_template: str = RESID_PRE

    def __post_init__(self) -> None:
        _check_vectors("DirectionalAblation", self.layers, self.directions)

    def hook_name(self, layer: int) -> str:
        return self.hook_template.format(layer=layer)


Steering = AlphaSteer | ActAdd | DirectionalAblation


@dataclass(frozen=True)
class Composition:
    """Several steerings at once, ``parts[i] = (steering, λ_i)``: all their hooks are attached
    (they add up where they share a hook point), and the strength they are applied with
    multiplies every ``λ_i``. The audit steers a benign vector and AlphaSteer together this way.
    """

    parts: tuple[tuple[Steering, float], ...]

    def __post_init__(self) -> None:
        parts = tuple((s, check_strength(lam)) for s, lam in self.parts)
        for s, _ in parts:
            if not isinstance(s, AlphaSteer | ActAdd | DirectionalAblation):
                raise ValueError(f"Composition parts must be steerings, got {type(s).__name__}")
        object.__setattr__(self, "parts", parts)

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(sorted({layer for s, _ in self.parts for layer in s.layers}))


AnySteering = Steering | Composition


def _check_vectors(kind: str, layers: Sequence[int], vectors: Tensor) -> None:
    if vectors.ndim != 2 or vectors.shape[0] != len(layers):
        raise ValueError(
            f"{kind}: vectors must be [n_layers, d_model] with one row per layer; got "
            f"{tuple(vectors.shape)} for {len(layers)} layers"
        )
    if not torch.isfinite(vectors).all():
        raise ValueError(f"{kind}: vectors contain NaN or inf")
    if len(set(layers)) != len(layers) or any(layer < 0 for layer in layers):
        raise ValueError(f"{kind}: layers must be unique and non-negative, got {list(layers)}")


class _PassTracker:
    """Tells, from the activations a hook sees, which absolute positions a pass covers.

    A pass is a new prefill unless it continues the last one: a single position (decode step
    with a KV cache), or one position more than before (full re-run without a KV cache). With
    ``prompt_len`` pinned (as generation does) the length alone decides; without it, a pass one
    position longer counts as a re-run only if its first positions equal the previous pass's
    input, so consecutive batches that happen to differ in width by one are each a new prefill.
    """

    def __init__(self, prompt_len: int | None) -> None:
        self.fixed_prompt_len = prompt_len
        self.prompt_len = prompt_len or 0
        self.total = 0
        self.calls = 0
        self.previous: Tensor | None = None  # last multi-position input, when not pinned

    def _reruns(self, act: Tensor) -> bool:
        if self.calls == 0 or act.shape[1] != self.total + 1:
            return False
        if self.fixed_prompt_len is not None:
            return True
        prev = self.previous
        return (
            prev is not None
            and prev.shape == act[:, : self.total].shape
            and torch.allclose(act[:, : self.total], prev, rtol=1e-3, atol=1e-3)
        )

    def start(self, act: Tensor) -> int:
        """Record a pass over ``act`` [batch, n, d]; return the absolute position of its first
        position."""
        n = int(act.shape[1])
        decode = self.calls > 0 and n == 1 and self.total >= self.prompt_len
        continues_full = not decode and self._reruns(act)
        self.calls += 1
        if decode:
            self.total += 1
            return self.total - 1
        if self.fixed_prompt_len is None:
            self.previous = act.detach().clone()
        if not continues_full:
            self.prompt_len = self.fixed_prompt_len or n
        self.total = n
        return 0


def _position_mask(
    offset: int,
    n: int,
    prompt_len: int,
    positions: Positions,
    generated: bool,
    instruction_end: Tensor | None,
    batch: int,
    device: torch.device,
) -> Tensor:
    """[batch, n] bool mask of the positions to steer in a pass starting at ``offset``."""
    absolute = torch.arange(offset, offset + n, device=device).unsqueeze(0).expand(batch, n)
    in_prompt = absolute < prompt_len
    if positions == "prompt":
        chosen = in_prompt
    elif positions == "last":
        chosen = absolute == prompt_len - 1
    elif positions == "instruction_end":
        if instruction_end is None:
            start = torch.full((batch, 1), prompt_len - 1, device=device)
        else:
            start = instruction_end.to(device).reshape(batch, 1)
        chosen = in_prompt & (absolute >= start)
    else:
        raise ValueError(
            f"positions must be 'prompt', 'last' or 'instruction_end', not {positions!r}"
        )
    if generated:
        chosen = chosen | ~in_prompt
    return chosen


def check_strength(strength: float) -> float:
    strength = float(strength)
    if not math.isfinite(strength):
        raise ValueError(f"steering strength must be finite, got {strength}")
    return strength


def _scaled(strength: float | Sequence[float], factor: float) -> float | list[float]:
    if isinstance(strength, (int, float)):
        return float(strength) * factor
    return [float(x) * factor for x in strength]


def steering_hooks(
    steering: AnySteering,
    strength: float | Sequence[float] = 1.0,
    *,
    positions: Positions = "prompt",
    generated: bool = False,
    prompt_len: int | None = None,
    instruction_end: Tensor | None = None,
    d_model: int | None = None,
) -> list[tuple[str, HookFn]]:
    """``(hook_name, fn)`` pairs for ``model.hooks`` / ``run_with_hooks``.

    ``strength`` is one λ, or one per batch row (SCANS' ±α). ``prompt_len`` pins the prompt
    length when a pass holds more than the prompt (e.g. prompt + reference answer).
    """
    if isinstance(steering, Composition):
        return [
            hook
            for part, lam_i in steering.parts
            for hook in steering_hooks(
                part, _scaled(strength, lam_i), positions=positions, generated=generated,
                prompt_len=prompt_len, instruction_end=instruction_end, d_model=d_model,
            )
        ]  # fmt: skip
    if isinstance(strength, (int, float)):
        lam: Tensor = torch.tensor([check_strength(strength)])
    else:
        lam = torch.tensor([check_strength(s) for s in strength])
    if isinstance(steering, AlphaSteer):
        vectors = steering.r
    elif isinstance(steering, ActAdd):
        vectors = steering.vectors
    else:
        vectors = steering.directions
    if d_model is not None and vectors.shape[-1] != d_model:
        raise ValueError(
            f"steering vectors have d_model={vectors.shape[-1]} but the model has d_model={d_model}"
        )
    hooks: list[tuple[str, HookFn]] = []
    for i, layer in enumerate(steering.layers):
        tracker = _PassTracker(prompt_len)
        coef: dict[str, Tensor] = {}

        def fn(
            act: Tensor,
            hook: Any,
            i: int = i,
            tracker: _PassTracker = tracker,
            coef: dict[str, Tensor] = coef,
        ) -> Tensor:
            batch, n = act.shape[0], act.shape[1]
            offset = tracker.start(act)
            mask = _position_mask(
                offset,
                n,
                tracker.prompt_len,
                positions,
                generated,
                instruction_end,
                batch,
                act.device,
            ).unsqueeze(-1)
            lam_b = lam.to(act.device, act.dtype).reshape(-1, 1, 1)
            if isinstance(steering, AlphaSteer):
                w = steering.w[i].to(act.device, act.dtype)
                r = steering.r[i].to(act.device, act.dtype)
                if offset == 0:
                    coef["c"] = act[:, tracker.prompt_len - 1] @ w  # h_last · w, per row
                delta = coef["c"].reshape(-1, 1, 1) * r
                return act + mask * lam_b * delta
            if isinstance(steering, ActAdd):
                v = steering.vectors[i].to(act.device, act.dtype)
                return act + mask * lam_b * v
            r_hat = steering.directions[i].to(act.device, act.dtype)
            r_hat = r_hat / r_hat.norm()
            return act - mask * lam_b * (act @ r_hat).unsqueeze(-1) * r_hat

        hooks.append((steering.hook_name(layer), fn))
    return hooks


@contextmanager
def steer(
    model: HookedModel,
    steering: AnySteering,
    strength: float | Sequence[float] = 1.0,
    *,
    positions: Positions = "prompt",
    generated: bool = False,
    prompt_len: int | None = None,
    instruction_end: Tensor | None = None,
) -> Iterator[HookedModel]:
    """Context manager: inside it, every forward pass and ``generate`` call is steered."""
    n_layers = int(model.cfg.n_layers)
    for layer in steering.layers:
        if layer >= n_layers:
            raise ValueError(
                f"steering layer {layer} is out of range: the model has {n_layers} layers"
            )
    hooks = steering_hooks(
        steering,
        strength,
        positions=positions,
        generated=generated,
        prompt_len=prompt_len,
        instruction_end=instruction_end,
        d_model=int(model.cfg.d_model),
    )
    known = hook_names(model)
    for name, _ in hooks:
        if known and name not in known:
            raise ValueError(f"hook {name!r} does not exist on this model")
    with model.hooks(fwd_hooks=hooks):
        yield model
