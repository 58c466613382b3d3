"""Prompt encoding: a :class:`~alphasteer_lens.formats.PromptFormat`, then left-padded batches.

A chat template string already holds the special tokens, so it is tokenised without adding
more; raw and template formats get a BOS token as TransformerLens would prepend one. Batches
are left-padded with an attention mask, which puts every prompt's last token at ``-1``: the
position AlphaSteer reads and the position generation continues from.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from alphasteer_lens.formats import PromptFormat, resolve_format
from alphasteer_lens.passes import Prompt, prompt_bounds


@dataclass(frozen=True)
class ChatBatch:
    """A left-padded batch of chat-formatted prompts.

    ``instruction_end[i]`` is the position (in padded coordinates) of the last token of prompt
    ``i``'s user content; the tokens after it are the template's assistant header.
    """

    tokens: Int[Tensor, "batch pos"]
    attention_mask: Int[Tensor, "batch pos"]
    instruction_end: Int[Tensor, " batch"]
    texts: tuple[str, ...]

    @property
    def prompt_len(self) -> int:
        return int(self.tokens.shape[1])

    def prompt(self) -> Prompt:
        """Where each row's prompt lies: what generation tells the steering runtime."""
        return prompt_bounds(self.tokens, self.attention_mask, instruction_end=self.instruction_end)

    def to(self, device: torch.device | str) -> ChatBatch:
        return ChatBatch(
            self.tokens.to(device),
            self.attention_mask.to(device),
            self.instruction_end.to(device),
            self.texts,
        )


def format_chat(
    tokenizer: Any,
    prompt: str,
    *,
    system: str | None = None,
    assistant_prefix: str = "",
    template: str | None = None,
) -> str:
    """One user turn as the model's chat template renders it, ready for the assistant's reply.

    ``template`` (a string with a ``{prompt}`` slot) replaces the tokenizer's chat template, for
    base models that have none. ``assistant_prefix`` is appended after the assistant header
    (SCANS uses " Sure"). :class:`~alphasteer_lens.formats.PromptFormat` covers all formats.
    """
    if template is not None:
        if "{prompt}" not in template:
            raise ValueError("chat template string must contain a '{prompt}' slot")
        return template.replace("{prompt}", prompt) + assistant_prefix
    return PromptFormat.chat(system, assistant_prefix).render(tokenizer, prompt)


def model_format(
    model: Any,
    prompt_format: PromptFormat | str | None,
    system: str | None,
    assistant_prefix: str,
    template: str | None = None,
) -> PromptFormat:
    if template is not None:
        if prompt_format is not None:
            raise ValueError("pass either template= or prompt_format=, not both")
        prompt_format = PromptFormat.user_template(template, bos=False)
    return resolve_format(
        model.tokenizer, prompt_format, system=system, assistant_prefix=assistant_prefix
    )


def encode_texts(
    model: Any, prompts: Sequence[str], fmt: PromptFormat
) -> tuple[list[str], list[list[int]]]:
    """Each prompt rendered by ``fmt`` and its token ids (a BOS first where ``fmt`` wants one)."""
    tokenizer = model.tokenizer
    texts = [fmt.render(tokenizer, p) for p in prompts]
    ids = [list(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None and fmt.prepends_bos(model.cfg):
        ids = [row if row[:1] == [bos] else [int(bos), *row] for row in ids]
    for i, row in enumerate(ids):
        if not row:
            raise ValueError(f"prompt {i} ({prompts[i][:60]!r}) is empty after tokenisation")
    return texts, ids


def _suffix_tokens(tokenizer: Any, text: str, prompt: str) -> int:
    """How many tokens of ``text`` come after the user's ``prompt`` (the assistant header)."""
    end = text.rfind(prompt)
    if end < 0:
        return 0
    suffix = text[end + len(prompt) :]
    if not suffix:
        return 0
    return len(tokenizer(suffix, add_special_tokens=False)["input_ids"])


def check_prompts(prompts: Sequence[str], batch_size: int) -> list[str]:
    """The prompts as a list, after checking there is at least one, each is a ``str``, and
    ``batch_size >= 1``: the errors every batched model call shares."""
    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompt set is empty: nothing to run")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise TypeError(f"prompt {i} is {type(p).__name__}, not str")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return prompts


MAX_BATCH_TOKENS = 8192  # padded tokens per batch (rows × longest prompt)


def length_batches(
    lengths: Sequence[int], batch_size: int, max_batch_tokens: int | None = None
) -> list[list[int]]:
    """Indices grouped into batches of similar length (shortest first), each holding at most
    ``batch_size`` rows and, when ``max_batch_tokens`` is given, at most that many padded tokens
    (rows × longest row; a single longer row still gets a batch of its own). Left padding costs
    compute on every padded position, so one long prompt should not pad thirty short ones."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_batch_tokens is not None and max_batch_tokens < 1:
        raise ValueError(f"max_batch_tokens must be >= 1, got {max_batch_tokens}")
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: list[list[int]] = []
    for i in order:
        last = batches[-1] if batches else None
        fits = (
            last is not None
            and len(last) < batch_size
            and (max_batch_tokens is None or (len(last) + 1) * lengths[i] <= max_batch_tokens)
        )
        if fits and last is not None:
            last.append(i)
        else:
            batches.append([i])
    return batches


def chat_lengths(
    model: Any,
    prompts: Sequence[str],
    *,
    system: str | None = None,
    assistant_prefix: str = "",
    prompt_format: PromptFormat | str | None = None,
) -> list[int]:
    """Token count of each prompt after formatting (what :func:`encode_chat` pads to)."""
    fmt = model_format(model, prompt_format, system, assistant_prefix)
    return [len(row) for row in encode_texts(model, prompts, fmt)[1]]


def encode_chat(
    model: Any,
    prompts: Sequence[str],
    *,
    system: str | None = None,
    assistant_prefix: str = "",
    template: str | None = None,
    max_tokens: int | None = None,
    prompt_format: PromptFormat | str | None = None,
) -> ChatBatch:
    """Format (``prompt_format``, default :func:`~alphasteer_lens.formats.default_format`) and
    tokenise ``prompts`` as one left-padded batch with an attention mask.

    Prompts longer than the model's context or ``max_tokens`` (the smaller) are refused with an
    error that names the prompt (its index in this batch and its opening words): silently
    truncating a harmful request can change what it asks.
    """
    if len(prompts) == 0:
        raise ValueError("no prompts to encode")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise TypeError(f"prompt {i} is {type(p).__name__}, not str")
    tokenizer = model.tokenizer
    fmt = model_format(model, prompt_format, system, assistant_prefix, template)
    texts, ids = encode_texts(model, prompts, fmt)
    n_ctx = int(getattr(model.cfg, "n_ctx", 0) or 0)
    limits = [x for x in (max_tokens, n_ctx) if x]
    limit = min(limits) if limits else None
    what = "the model's context (n_ctx)" if limit == n_ctx else "max_tokens"
    for i, row in enumerate(ids):
        if limit is not None and len(row) > limit:
            raise ValueError(
                f"prompt {i} ({prompts[i][:60]!r}) is {len(row)} tokens after formatting, "
                f"longer than the limit of {limit} ({what}); it is refused rather than "
                "silently truncated: shorten it"
            )
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        warnings.warn("tokenizer has no pad token; padding with eos (masked out)", stacklevel=2)
    width = max(len(r) for r in ids)
    tokens = torch.full((len(ids), width), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, row in enumerate(ids):
        tokens[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row) :] = 1
    suffix = [_suffix_tokens(tokenizer, t, p) for t, p in zip(texts, prompts, strict=True)]
    instruction_end = torch.tensor([width - 1 - s for s in suffix], dtype=torch.long)
    return ChatBatch(tokens, mask, instruction_end, tuple(texts))
