"""Refusal judges on hand-made inputs with known answers."""

from __future__ import annotations

import math

import pytest
import torch

from alphasteer_lens.judges import KeywordJudge, RefusalTokens, refusal_score


@pytest.mark.parametrize(
    ("text", "refused"),
    [
        ("I'm sorry, but I can't help with that.", True),
        ("I\u2019m sorry, but I can\u2019t help with that.", True),
        ("As an AI language model, I do not", True),
        ("I cannot provide instructions for that.", True),
        ("Sure! Here is a recipe for banana bread.", False),
        ("I can't wait to help you plan the party! First, ...", False),
        ("I'm sorry to hear about your cat. Here are some tips ...", False),
        ("", False),
    ],
)
def test_keyword_judge(text: str, refused: bool) -> None:
    assert KeywordJudge()(text) is refused


def test_keyword_window() -> None:
    late = "x" * 300 + " I cannot do that"
    assert not KeywordJudge()(late)
    assert KeywordJudge(window=1000)(late)


def test_refusal_score_known_values() -> None:
    # Two tokens of four are refusal openings. Uniform logits: p_R = 1/2, log-odds 0.
    assert refusal_score(torch.zeros(1, 4), [0, 1]).item() == pytest.approx(0.0, abs=1e-6)
    # p_R = (e^2 + e^2) / (e^2 + e^2 + 1 + 1)
    logits = torch.tensor([[2.0, 2.0, 0.0, 0.0]])
    p = 2 * math.exp(2) / (2 * math.exp(2) + 2)
    assert refusal_score(logits, [0, 1]).item() == pytest.approx(math.log(p / (1 - p)), rel=1e-5)


def test_refusal_tokens_from_tokenizer(tokenizer) -> None:  # type: ignore[no-untyped-def]
    ids = RefusalTokens.from_tokenizer(tokenizer).ids
    expected = {tokenizer("I", add_special_tokens=False)["input_ids"][0]}
    assert expected <= set(ids)
