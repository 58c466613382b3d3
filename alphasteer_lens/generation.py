"""Batched greedy generation and first-token logits, optionally steered.

Prompts are chat-formatted and left-padded per batch (sorted by length to keep padding small);
results come back in the input order.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from contextlib import ExitStack, nullcontext
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from alphasteer_lens.chat import (
    MAX_BATCH_TOKENS,
    ChatBatch,
    chat_lengths,
    check_prompts,
    encode_chat,
    length_batches,
)
from alphasteer_lens.formats import PromptFormat
from alphasteer_lens.models import HookedModel, hook_names
from alphasteer_lens.passes import SteerPositions
from alphasteer_lens.steering import AnySteering, steer


def _batches(
    model: HookedModel,
    prompts: Sequence[str],
    batch_size: int,
    system: str | None,
    prompt_format: PromptFormat | str | None = None,
) -> list[list[int]]:
    prompts = check_prompts(prompts, batch_size)
    lengths = chat_lengths(model, prompts, system=system, prompt_format=prompt_format)
    return length_batches(lengths, batch_size, MAX_BATCH_TOKENS)


def _keep_last(act: Tensor, hook: Any) -> Tensor:
    return act[:, -1:]


def last_position_logits(model: HookedModel) -> Any:
    """Context in which the model unembeds only the last position (``[batch, 1, d_vocab]``
    logits): a hook slices the final residual stream before the unembedding. Generation and
    next-token scoring read only ``logits[:, -1]``, and the full-vocabulary product at every
    prompt position is the largest single cost of a long prefill."""
    names = hook_names(model)
    for name in ("unembed.hook_in", "ln_final.hook_normalized"):
        if name in names:
            return model.hooks(fwd_hooks=[(name, _keep_last)])
    return nullcontext(model)


def steering_context(
    model: HookedModel,
    steering: AnySteering | None,
    strength: float | Sequence[float],
    batch: ChatBatch,
    positions: SteerPositions | None = None,
    generated: bool = False,
) -> Any:
    """:func:`steer` told where one encoded batch's prompts lie (and their instruction ends);
    a no-op context for ``steering=None``."""
    if steering is None:
        return nullcontext(model)
    return steer(
        model, steering, strength, positions=positions, generated=generated, prompt=batch.prompt()
    )


def _mask_kwargs(model: HookedModel, batch: ChatBatch) -> dict[str, Any]:
    """TransformerBridge.generate takes the attention mask; TL 3.x HookedTransformer.generate
    derives it from the leading pad tokens when told the padding is on the left."""
    if "attention_mask" in inspect.signature(model.generate).parameters:
        return {"attention_mask": batch.attention_mask}
    return {"padding_side": "left"}


def check_max_new_tokens(max_new_tokens: int) -> int:
    if (
        isinstance(max_new_tokens, bool)
        or not isinstance(max_new_tokens, int)
        or max_new_tokens < 1
    ):
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    return max_new_tokens


def _row_strength(strength: float | Sequence[float], idx: list[int]) -> float | list[float]:
    if isinstance(strength, (int, float)):
        return float(strength)
    return [float(strength[i]) for i in idx]


@torch.no_grad()
def generate(
    model: HookedModel,
    prompts: Sequence[str],
    *,
    steering: AnySteering | None = None,
    strength: float | Sequence[float] = 1.0,
    positions: SteerPositions | None = None,
    generated: bool = False,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    use_kv_cache: bool = True,
    system: str | None = None,
    prompt_format: PromptFormat | str | None = None,
    progress: bool = True,
    desc: str = "generating",
) -> list[str]:
    """Greedy continuations of ``prompts`` (chat-formatted), steered if ``steering`` is given.

    ``strength`` may be one λ or one per prompt (SCANS steers each prompt by its own sign).
    """
    texts, _ = generate_with_logits(
        model, prompts, steering=steering, strength=strength, positions=positions,
        generated=generated, max_new_tokens=max_new_tokens, batch_size=batch_size,
        use_kv_cache=use_kv_cache, system=system, prompt_format=prompt_format,
        progress=progress, desc=desc, first_logits=False,
    )  # fmt: skip
    return texts


@torch.no_grad()
def generate_with_logits(
    model: HookedModel,
    prompts: Sequence[str],
    *,
    steering: AnySteering | None = None,
    strength: float | Sequence[float] = 1.0,
    positions: SteerPositions | None = None,
    generated: bool = False,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    use_kv_cache: bool = True,
    system: str | None = None,
    prompt_format: PromptFormat | str | None = None,
    progress: bool = True,
    desc: str = "generating",
    first_logits: bool = True,
) -> tuple[list[str], Float[Tensor, "n d_vocab"] | None]:
    """:func:`generate`, plus the logits at the first generated position (what
    :func:`next_token_logits` returns) read from generation's own prefill, so scoring the
    first token costs no second forward pass. Models without an ``unembed.hook_out`` hook point
    get them from a separate forward pass."""
    if not isinstance(strength, (int, float)) and len(strength) != len(prompts):
        raise ValueError(f"{len(strength)} strengths for {len(prompts)} prompts")
    check_max_new_tokens(max_new_tokens)
    out: list[str] = [""] * len(prompts)
    firsts: list[Tensor] = [torch.empty(0)] * len(prompts)
    from_prefill = first_logits and _PREFILL_HOOK in hook_names(model)
    batches = _batches(model, prompts, batch_size, system, prompt_format)
    for idx in tqdm(batches, desc=desc, disable=not progress, leave=False):
        batch = encode_chat(
            model, [prompts[i] for i in idx], system=system, prompt_format=prompt_format
        ).to(model.cfg.device)
        seen: list[Tensor] = []
        with ExitStack() as stack:
            if from_prefill:
                stack.enter_context(model.hooks(fwd_hooks=[(_PREFILL_HOOK, _first_call(seen))]))
            rows = greedy_batch(
                model, batch, steering=steering, strength=_row_strength(strength, idx),
                positions=positions, generated=generated, max_new_tokens=max_new_tokens,
                use_kv_cache=use_kv_cache,
            )  # fmt: skip
        for j, (toks, i) in enumerate(zip(rows, idx, strict=True)):
            out[i] = model.tokenizer.decode(toks, skip_special_tokens=True)
            if from_prefill:
                firsts[i] = seen[0][j]
    if not first_logits:
        return out, None
    if not from_prefill:
        scored = next_token_logits(
            model, prompts, steering=steering, strength=strength, positions=positions,
            batch_size=batch_size, system=system, prompt_format=prompt_format, progress=progress,
            desc=desc,
        )  # fmt: skip
        return out, scored
    return out, torch.stack(firsts)


_PREFILL_HOOK = "unembed.hook_out"


def _first_call(seen: list[Tensor]) -> Any:
    """A hook that keeps the last-position logits of the first forward call (the prefill)."""

    def hook(logits: Tensor, hook: Any) -> None:
        if not seen:
            seen.append(logits[:, -1].detach().float().cpu())

    return hook


@torch.no_grad()
def greedy_batch(
    model: HookedModel,
    batch: ChatBatch,
    *,
    steering: AnySteering | None = None,
    strength: float | Sequence[float] = 1.0,
    positions: SteerPositions | None = None,
    generated: bool = False,
    max_new_tokens: int = 64,
    use_kv_cache: bool = True,
) -> list[list[int]]:
    """Greedy continuation token ids of one encoded batch, each cut before its first EOS."""
    check_max_new_tokens(max_new_tokens)
    eos = model.tokenizer.eos_token_id
    with ExitStack() as stack:
        stack.enter_context(last_position_logits(model))
        stack.enter_context(
            steering_context(model, steering, strength, batch, positions, generated)
        )
        tokens = model.generate(
            batch.tokens,
            **_mask_kwargs(model, batch),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            use_past_kv_cache=use_kv_cache,
            stop_at_eos=True,
            eos_token_id=eos,
            return_type="tokens",
            verbose=False,
        )
    rows = tokens[:, batch.prompt_len :].tolist()
    return [row[: row.index(eos)] if eos is not None and eos in row else row for row in rows]


@torch.no_grad()
def next_token_logits(
    model: HookedModel,
    prompts: Sequence[str],
    *,
    steering: AnySteering | None = None,
    strength: float | Sequence[float] = 1.0,
    positions: SteerPositions | None = None,
    batch_size: int = 16,
    system: str | None = None,
    prompt_format: PromptFormat | str | None = None,
    progress: bool = True,
    desc: str = "scoring",
) -> Float[Tensor, "n d_vocab"]:
    """Logits at the first generated position: one forward pass per prompt, no decoding."""
    rows: list[Tensor] = [torch.empty(0)] * len(prompts)
    batches = _batches(model, prompts, batch_size, system, prompt_format)
    for idx in tqdm(batches, desc=desc, disable=not progress, leave=False):
        batch = encode_chat(
            model, [prompts[i] for i in idx], system=system, prompt_format=prompt_format
        ).to(model.cfg.device)
        with ExitStack() as stack:
            stack.enter_context(last_position_logits(model))
            stack.enter_context(
                steering_context(model, steering, _row_strength(strength, idx), batch, positions)
            )
            logits = model(batch.tokens, attention_mask=batch.attention_mask)
        last = logits[:, -1].float().cpu()
        for row, i in enumerate(idx):
            rows[i] = last[row]
    return torch.stack(rows)
