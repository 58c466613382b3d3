"""Steering a plain ``transformers`` model, without TransformerLens: forward hooks on its decoder
layers running the same :class:`~alphasteer_lens.steering.SteeringRuntime` as :func:`steer`.

``blocks.{l}.hook_resid_pre`` is the input of decoder layer ``l`` (a forward pre-hook on
``model.model.layers[l]``, ``transformer.h[l]`` or ``gpt_neox.layers[l]``) and
``blocks.{l}.hook_resid_post`` its output (a forward hook). A forward pre-hook on the module that
owns the layer list tells the runtime of every pass from its token ids, attention mask and KV
cache, so ``model.generate`` steers the prompt once and, for prompt-only positions, leaves the
decode steps alone, exactly as the TransformerLens path does. Under accelerate's ``device_map``
the hooks run before accelerate moves a layer's inputs; the runtime builds every delta on the
activation's own device.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from alphasteer_lens.hookpoints import layer_of
from alphasteer_lens.passes import Prompt, SteerPositions, cache_length
from alphasteer_lens.steering import AnySteering, SteeringRuntime

LAYER_PATHS = (
    "model.layers",  # Llama, Mistral, Qwen2, Gemma, Phi-3
    "transformer.h",  # GPT-2
    "gpt_neox.layers",  # GPT-NeoX / Pythia
    "model.decoder.layers",  # OPT
    "model.language_model.layers",  # multimodal wrappers
)
_TOKEN_KEYS = ("input_ids", "inputs_embeds")
_CACHE_KEYS = ("past_key_values", "cache", "layer_past")


def _get(module: nn.Module, path: str) -> Any:
    out: Any = module
    for part in path.split("."):
        out = getattr(out, part, None)
        if out is None:
            return None
    return out


def decoder_layers(hf_model: nn.Module) -> tuple[nn.Module, nn.ModuleList]:
    """The module that runs the decoder stack and its list of decoder layers (layer ``l`` takes
    ``blocks.{l}.hook_resid_pre``)."""
    for path in LAYER_PATHS:
        layers = _get(hf_model, path)
        if isinstance(layers, nn.ModuleList) and len(layers) > 0:
            owner = _get(hf_model, path.rsplit(".", 1)[0])
            return owner, layers
    raise ValueError(
        f"cannot find the decoder layers of {type(hf_model).__name__}: looked for "
        f"{list(LAYER_PATHS)}"
    )


class SteeringHandle:
    """Hooks attached by :func:`attach`; :meth:`detach` removes them (also on leaving a
    ``with`` block). ``runtime`` holds the pass state."""

    def __init__(self, model: nn.Module, runtime: SteeringRuntime) -> None:
        self.model = model
        self.runtime = runtime
        self._removers: list[Callable[[], None]] = []

    @property
    def attached(self) -> bool:
        return bool(self._removers)

    def detach(self) -> None:
        for remove in reversed(self._removers):
            remove()
        self._removers.clear()

    def __enter__(self) -> SteeringHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()


def _hidden(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Tensor, bool]:
    if args and isinstance(args[0], Tensor):
        return args[0], True
    h = kwargs.get("hidden_states")
    if not isinstance(h, Tensor):
        raise ValueError("decoder layer called without hidden states")
    return h, False


def _begin_hook(runtime: SteeringRuntime) -> Callable[..., None]:
    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        x = args[0] if args else None
        if x is None:
            x = next((kwargs[k] for k in _TOKEN_KEYS if kwargs.get(k) is not None), None)
        cached = any(cache_length(kwargs.get(k)) > 0 for k in _CACHE_KEYS)
        mask = kwargs.get("attention_mask")
        if isinstance(mask, Tensor) and mask.ndim != 2:
            mask = None  # a 4-D mask made by the caller: fall back to the pad tokens
        if not isinstance(x, Tensor):
            raise ValueError("a steered forward pass needs input_ids or inputs_embeds")
        if x.is_floating_point():  # embeddings
            b, n = int(x.shape[0]), int(x.shape[1])
            runtime.reader.begin(None, mask, cached=cached, shape=(b, n))
        else:
            runtime.begin_pass(x.unsqueeze(0) if x.ndim == 1 else x, mask, cached=cached)

    return hook


def _pre_hook(runtime: SteeringRuntime, name: str) -> Callable[..., Any]:
    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        h, positional = _hidden(args, kwargs)
        out = runtime.apply(name, h)
        if positional:
            return (out, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": out}

    return hook


def _post_hook(runtime: SteeringRuntime, name: str) -> Callable[..., Any]:
    def hook(module: nn.Module, args: Any, output: Any) -> Any:
        if isinstance(output, Tensor):
            return runtime.apply(name, output)
        return (runtime.apply(name, output[0]), *output[1:])

    return hook


def _wrap_generate(model: nn.Module, runtime: SteeringRuntime) -> Callable[[], None]:
    """Each ``model.generate`` call starts a fresh generation (its first pass is a prefill)."""
    inner: Callable[..., Any] = getattr(model, "generate")  # noqa: B009

    def generate(*args: Any, **kwargs: Any) -> Any:
        with runtime.reader.generation():
            return inner(*args, **kwargs)

    object.__setattr__(model, "generate", generate)

    def restore() -> None:
        if vars(model).get("generate") is generate:
            object.__delattr__(model, "generate")

    return restore


def attach(
    hf_model: nn.Module,
    steering: AnySteering,
    strength: float | Sequence[float] = 1.0,
    *,
    positions: SteerPositions | None = None,
    generated: bool = False,
    prompt: Prompt | None = None,
    padding_side: str = "left",
    instruction_end: Tensor | None = None,
) -> SteeringHandle:
    """Steer ``hf_model`` (a ``transformers`` causal LM) until the handle is detached.

    The semantics are those of :func:`~alphasteer_lens.steering.steer`: each pass is read from
    its token ids, attention mask and KV cache; AlphaSteer and ActAdd steer the prompt by
    default (``positions="all"`` adds generated tokens, as llama.cpp does); hooks other than
    ``hook_resid_pre`` / ``hook_resid_post`` are refused. ``prompt`` fixes where the prompt lies
    instead of reading it from each prefill's attention mask (pads of ``padding_side`` without
    a mask)."""
    if getattr(hf_model, "_alphasteer_handle", None) is not None:
        raise ValueError(
            "this model is already steered: detach the first handle, or attach one Composition"
        )
    owner, layers = decoder_layers(hf_model)
    config = getattr(hf_model, "config", None)
    runtime = SteeringRuntime(
        steering,
        strength,
        positions=positions,
        generated=generated,
        d_model=getattr(config, "hidden_size", None),
        dtype=next(hf_model.parameters()).dtype,
        prompt=prompt,
        pad_id=getattr(config, "pad_token_id", None),
        padding_side=padding_side,
        instruction_end=instruction_end,
    )
    plan: list[tuple[str, int, bool]] = []
    for name in runtime.hook_names():
        layer = layer_of(name)
        if not layer < len(layers):
            raise ValueError(f"steering hook {name} is out of range: the model has {len(layers)}")
        suffix = name.split(".", 2)[2]
        if suffix not in ("hook_resid_pre", "hook_resid_post"):
            raise ValueError(
                f"cannot steer {name} in a plain transformers model: only hook_resid_pre (the "
                "input of a decoder layer) and hook_resid_post (its output) are reachable"
            )
        plan.append((name, layer, suffix == "hook_resid_pre"))
    handle = SteeringHandle(hf_model, runtime)
    removers = handle._removers
    begin = owner.register_forward_pre_hook(_begin_hook(runtime), with_kwargs=True)
    removers.append(begin.remove)
    for name, layer, pre in plan:
        if pre:
            h = layers[layer].register_forward_pre_hook(_pre_hook(runtime, name), with_kwargs=True)
        else:
            h = layers[layer].register_forward_hook(_post_hook(runtime, name))
        removers.append(h.remove)
    if callable(getattr(hf_model, "generate", None)):
        removers.append(_wrap_generate(hf_model, runtime))
    object.__setattr__(hf_model, "_alphasteer_handle", handle)
    removers.insert(0, lambda: object.__delattr__(hf_model, "_alphasteer_handle"))
    return handle


@torch.no_grad()
def generate_steered(
    hf_model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    steering: AnySteering | None,
    strength: float | Sequence[float] = 1.0,
    *,
    positions: SteerPositions | None = None,
    generated: bool = False,
    max_new_tokens: int = 32,
    eos_token_id: int | None = None,
) -> list[list[int]]:
    """Greedy continuation ids of a left-padded batch through ``hf_model.generate``, steered
    when ``steering`` is given; each row cut before its first EOS (as the TransformerLens path
    returns them)."""
    from contextlib import nullcontext

    ctx: Any = (
        nullcontext()
        if steering is None
        else attach(hf_model, steering, strength, positions=positions, generated=generated)
    )
    with ctx:
        out = hf_model.generate(  # type: ignore[operator]
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=eos_token_id,
            pad_token_id=eos_token_id,
        )
    rows = out[:, input_ids.shape[1] :].tolist()
    return [r[: r.index(eos_token_id)] if eos_token_id in r else r for r in rows]
