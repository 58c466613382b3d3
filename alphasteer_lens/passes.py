"""Pass state: where each row's prompt lies, and what kind of forward pass a hook is seeing.

A steering hook needs two facts it cannot read from activations: where each row's prompt ends
(left or right padding), and whether this forward pass is a **prefill** (the prompt, perhaps with
a continuation fed after it), a **decode** step (new tokens on top of a KV cache) or a **re-run**
(the whole sequence again, as generation without a KV cache does). Generation and caching know
both and say so; ``steer(...)`` around a user's own forward pass reads them from the token ids,
the attention mask and the KV-cache argument that pass is called with — never from activations.

One :data:`Positions` vocabulary serves caching and steering:

- ``"last"``: each row's last prompt token (AlphaSteer reads ``h_last`` there);
- ``"prompt"``: every real prompt token;
- ``"instruction_end"``: from the end of the user's instruction to the end of the prompt (SCANS);
- ``"all"``: steering: every prompt token and every generated token (directional ablation, llama.cpp
  control vectors); caching: every prompt position, as ``"prompt"``;
- ``"mean"`` (caching only): the mean over the prompt's real tokens; a list of ints (caching only):
  positions counted from each prompt's first real token (negative: from its last).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

Positions = Literal["last", "prompt", "instruction_end", "all", "mean", "last+mean"] | Sequence[int]
SteerPositions = Literal["last", "prompt", "instruction_end", "all"]
STEER_POSITIONS = ("last", "prompt", "instruction_end", "all")
PassKind = Literal["prefill", "decode", "rerun"]


def check_steer_positions(positions: object) -> SteerPositions:
    if positions not in STEER_POSITIONS:
        raise ValueError(
            f"steering positions must be one of {list(STEER_POSITIONS)}, got {positions!r}"
        )
    return positions  # type: ignore[return-value]


@dataclass(frozen=True)
class Prompt:
    """Where the prompt of each row lies in a prefill input ``[batch, width]``: its first and
    last real token (``start``, ``end``) and the last token of the user's instruction
    (``instruction_end``; the tokens after it, up to ``end``, are the template's assistant
    header). Columns from ``width`` on are not prompt: they are generated or fed continuations."""

    width: int
    start: Int[Tensor, " batch"]
    end: Int[Tensor, " batch"]
    instruction_end: Int[Tensor, " batch"]

    @property
    def batch(self) -> int:
        return int(self.end.shape[0])


def prompt_bounds(
    tokens: Int[Tensor, "batch pos"],
    attention_mask: Tensor | None = None,
    *,
    pad_id: int | None = None,
    padding_side: str = "left",
    instruction_end: Tensor | None = None,
    bos_id: int | None = None,
) -> Prompt:
    """The :class:`Prompt` of a padded batch: from the attention mask when there is one (its
    first and last 1 per row), else from the run of ``pad_id`` on ``padding_side``; with neither
    every column is prompt. ``instruction_end`` defaults to the last prompt token.

    ``bos_id``: the BOS token that was prepended, if any. Where it equals ``pad_id`` (GPT-2,
    Pythia) a left pad run ends in that BOS, so its last token is taken as prompt, as
    TransformerLens' own attention mask does."""
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [batch, pos], got shape {tuple(tokens.shape)}")
    b, n = tokens.shape
    cols = torch.arange(n, device=tokens.device).expand(b, n)
    if attention_mask is not None:
        if tuple(attention_mask.shape) != (b, n):
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)} but tokens have {(b, n)}"
            )
        real = attention_mask.to(tokens.device).bool()
    elif pad_id is not None:
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        pad = tokens == pad_id
        # Only the run of pads at the padded end is padding; a pad id inside the prompt is real.
        edge = (
            pad.flip(1).cummin(1).values.flip(1)
            if padding_side == "right"
            else pad.cummin(1).values
        )
        if padding_side == "left" and bos_id is not None and bos_id == pad_id:
            run = edge.sum(1)  # the BOS is the last token of the left run
            edge = edge & (cols < (run - 1).clamp(min=0).unsqueeze(1))
        real = ~edge
    else:
        real = torch.ones(b, n, dtype=torch.bool, device=tokens.device)
    empty = ~real.any(1)
    real = real | (empty.unsqueeze(1) & (cols == n - 1))  # an all-pad row: its last column
    big = torch.full_like(cols, n)
    start = torch.where(real, cols, big).min(1).values
    end = torch.where(real, cols, torch.full_like(cols, -1)).max(1).values
    if instruction_end is None:
        instr = end.clone()
    else:
        instr = instruction_end.to(tokens.device).reshape(b).long()
    return Prompt(n, start.cpu(), end.cpu(), instr.cpu())


@dataclass
class PassState:
    """One forward pass as the steering hooks see it: ``kind``, the absolute position of its first
    column (``start``), its ``width``, the :class:`Prompt` of the prefill it continues, and
    ``memo``: values computed during the prefill (AlphaSteer's ``h_last·w``, a gate's decision)
    kept for the passes that follow, shared by every hook point of one ``steer(...)``."""

    kind: PassKind
    start: int
    width: int
    prompt: Prompt
    memo: dict[Any, Tensor] = field(default_factory=dict)

    def columns(self, device: torch.device | str = "cpu") -> Int[Tensor, " pos"]:
        return torch.arange(self.start, self.start + self.width, device=device)

    def covers_prompt_end(self) -> bool:
        end = self.prompt.end
        return bool(((end >= self.start) & (end < self.start + self.width)).all())

    def last_prompt(self, h: Float[Tensor, "batch pos d"]) -> Float[Tensor, "batch d"] | None:
        """``h`` at each row's last prompt token, or None when this pass does not hold it (a
        decode step)."""
        if not self.covers_prompt_end():
            return None
        rows = torch.arange(h.shape[0], device=h.device)
        return h[rows, (self.prompt.end - self.start).to(h.device)]

    def prompt_mean(self, h: Float[Tensor, "batch pos d"]) -> Float[Tensor, "batch d"]:
        """The mean of ``h`` over each row's prompt tokens (the pad columns left out), read in a
        pass that holds the whole prompt (the prefill)."""
        if not self.covers_prompt_end() or bool((self.prompt.start < self.start).any()):
            raise RuntimeError(
                "the prompt mean needs a pass that holds the whole prompt (the prefill); this "
                f"pass covers columns {self.start}..{self.start + self.width - 1}"
            )
        m = self.mask("prompt", False, h.device).to(h.dtype).unsqueeze(-1)
        return (h * m).sum(1) / m.sum(1)

    def mask(
        self, positions: SteerPositions, generated: bool, device: torch.device | str = "cpu"
    ) -> Bool[Tensor, "batch pos"]:
        """Which columns of this pass to steer, per row."""
        t = self.columns(device).unsqueeze(0)
        p = self.prompt
        start, end = p.start.to(device).unsqueeze(1), p.end.to(device).unsqueeze(1)
        in_prompt = (t >= start) & (t <= end)
        after = (t >= p.width).expand(p.batch, -1)
        if positions == "prompt":
            chosen = in_prompt
        elif positions == "last":
            chosen = t == end
        elif positions == "instruction_end":
            chosen = in_prompt & (t >= p.instruction_end.to(device).unsqueeze(1))
        elif positions == "all":
            chosen = in_prompt | after
        else:
            check_steer_positions(positions)
            raise AssertionError  # unreachable
        return chosen | after if generated else chosen


def cache_length(cache: object) -> int:
    """Positions already held by a KV cache argument: a Hugging Face ``Cache``, a legacy tuple,
    or TransformerLens 3.x's ``HookedTransformerKeyValueCache``; 0 for None or an empty one."""
    if cache is None:
        return 0
    get = getattr(cache, "get_seq_length", None)
    if callable(get):
        return int(get())
    entries = getattr(cache, "entries", None)
    if entries:
        keys = getattr(entries[0], "past_keys", None)
        return int(keys.shape[1]) if isinstance(keys, Tensor) else 0
    if isinstance(cache, (tuple, list)) and cache and isinstance(cache[0], (tuple, list)):
        first = cache[0][0]
        return int(first.shape[-2]) if isinstance(first, Tensor) else 0
    return 0


class PassReader:
    """Turns the inputs of successive forward passes into :class:`PassState`.

    A pass is a **decode** step when it comes with a non-empty KV cache (its columns continue the
    sequence), a **re-run** when its tokens extend those seen so far without a cache, and a new
    **prefill** otherwise. A prefill's prompt comes from ``told`` (what generation and caching
    say), else from its attention mask, else from the pad run on ``padding_side``.
    """

    def __init__(
        self,
        *,
        told: Prompt | None = None,
        pad_id: int | None = None,
        padding_side: str = "left",
        instruction_end: Tensor | None = None,
        bos_id: int | None = None,
    ) -> None:
        self.told = told
        self.pad_id = pad_id
        self.bos_id = bos_id
        self.padding_side = padding_side
        self.instruction_end = instruction_end
        self.state: PassState | None = None
        self._seq: Tensor | None = None  # the token ids seen since the last prefill
        self.generating = False

    def begin(
        self,
        tokens: Int[Tensor, "batch pos"] | None,
        attention_mask: Tensor | None = None,
        *,
        cached: bool = False,
        padding_side: str | None = None,
        shape: tuple[int, int] | None = None,
    ) -> PassState:
        """Classify the coming pass. ``tokens=None`` (a pass fed embeddings, as TransformerLens
        3.x's ``generate`` does) needs ``shape``; inside a generation (:meth:`generation`) its
        later passes are decode steps with a cache and re-runs without one."""
        if tokens is not None:
            if tokens.ndim != 2:
                raise ValueError(f"tokens must be [batch, pos], got shape {tuple(tokens.shape)}")
            tokens = tokens.detach().cpu()
            b, n = int(tokens.shape[0]), int(tokens.shape[1])
        elif shape is not None:
            b, n = shape
        else:
            raise ValueError("a pass needs its tokens or, for embeddings, its shape")
        prev, seq = self.state, self._seq
        continues = prev is not None and prev.prompt.batch == b
        if cached and continues and prev is not None:
            start = prev.start + prev.width
            state = PassState("decode", start, n, prev.prompt, prev.memo)
            if tokens is not None and seq is not None:
                self._seq = torch.cat([seq, tokens], 1)
        elif continues and prev is not None and self._reruns(tokens, n):
            state = PassState("rerun", 0, n, prev.prompt, prev.memo)
            self._seq = tokens
        else:
            if tokens is None and attention_mask is None and self.told is None:
                attention_mask = torch.ones(b, n, dtype=torch.long)
            placeholder = tokens if tokens is not None else torch.zeros(b, n, dtype=torch.long)
            prompt = self._prompt(placeholder, attention_mask, padding_side)
            state = PassState("prefill", 0, n, prompt)
            self._seq = tokens
        self.state = state
        return state

    def _reruns(self, tokens: Tensor | None, n: int) -> bool:
        prev, seq = self.state, self._seq
        assert prev is not None
        if tokens is None:  # embeddings: only a generation says that a longer pass is a re-run
            return self.generating and prev.kind != "decode" and n > prev.width
        return seq is not None and n > seq.shape[1] and torch.equal(tokens[:, : seq.shape[1]], seq)

    @contextmanager
    def generation(self) -> Iterator[None]:
        """Inside: one generation, whose first pass is its prefill."""
        self.state, self._seq, self.generating = None, None, True
        try:
            yield
        finally:
            self.generating = False

    def _prompt(self, tokens: Tensor, mask: Tensor | None, padding_side: str | None) -> Prompt:
        told = self.told
        if told is not None:
            if tokens.shape[0] != told.batch or tokens.shape[1] < told.width:
                raise ValueError(
                    f"a forward pass of shape {tuple(tokens.shape)} inside a steer(...) told of "
                    f"a {told.batch}-row prompt of width {told.width}: it cannot be that prompt"
                )
            return told
        side = padding_side or self.padding_side
        return prompt_bounds(
            tokens,
            None if mask is None else mask.detach().cpu(),
            pad_id=self.pad_id,
            padding_side=side,
            instruction_end=self.instruction_end,
            bos_id=self.bos_id,
        )
