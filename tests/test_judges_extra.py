"""The Judge protocol, the classifier judge on a tiny local model, and more keyword exclusions."""

from __future__ import annotations

import pytest
import torch

from alphasteer_lens.judges import ClassifierJudge, Judge, KeywordJudge

TEXTS = [
    "I'm sorry, but I cannot help with that request.",
    "Sure! Here are three ideas for a birthday party.",
    "ok",
    "Unfortunately, I am unable to do that because it could cause harm to other people.",
]


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory, tokenizer):  # type: ignore[no-untyped-def]
    """A tiny random Llama sequence classifier with labels compliance/refusal, saved locally."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_labels=2,
        id2label={0: "compliance", 1: "refusal"},
        label2id={"compliance": 0, "refusal": 1},
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForSequenceClassification(cfg).eval()
    with torch.no_grad():
        model.score.weight.normal_(0, 1.0)
    path = tmp_path_factory.mktemp("classifier")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_judges_satisfy_the_protocol(classifier_dir) -> None:  # type: ignore[no-untyped-def]
    assert isinstance(KeywordJudge(), Judge)
    assert isinstance(ClassifierJudge(classifier_dir), Judge)
    assert not isinstance(object(), Judge)


def test_classifier_scores_equal_unbatched_forward(classifier_dir) -> None:  # type: ignore[no-untyped-def]
    """Batched, padded scores equal one-text-at-a-time softmax probabilities of "refusal"."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    judge = ClassifierJudge(classifier_dir, batch_size=3)
    model = AutoModelForSequenceClassification.from_pretrained(classifier_dir).eval()
    tok = AutoTokenizer.from_pretrained(classifier_dir)
    expected = []
    with torch.no_grad():
        for t in TEXTS:
            logits = model(**tok(t, return_tensors="pt")).logits[0]
            expected.append(torch.softmax(logits, -1)[1].item())
    got = judge.scores(TEXTS)
    torch.testing.assert_close(got, torch.tensor(expected), rtol=1e-5, atol=1e-6)
    assert judge.judge(TEXTS) == [p >= 0.5 for p in expected]
    # The other label is the complement; label lookup is case-insensitive.
    other = ClassifierJudge(classifier_dir, refusal_label="COMPLIANCE").scores(TEXTS)
    torch.testing.assert_close(other, 1 - got, rtol=1e-5, atol=1e-6)
    assert torch.equal(ClassifierJudge(classifier_dir, refusal_label=1).scores(TEXTS), got)


def test_classifier_threshold(classifier_dir) -> None:  # type: ignore[no-untyped-def]
    scores = ClassifierJudge(classifier_dir).scores(TEXTS)
    cut = float(scores.median())
    judge = ClassifierJudge(classifier_dir, threshold=cut)
    assert judge.judge(TEXTS) == [bool(s >= cut) for s in scores]
    assert ClassifierJudge(classifier_dir, threshold=0.0).judge(TEXTS) == [True] * len(TEXTS)
    assert judge(TEXTS[0]) == bool(scores[0] >= cut)


def test_classifier_bad_input(classifier_dir, tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match="local model directory"):
        ClassifierJudge("some-org/refusal-classifier")  # a hub id: never downloaded
    with pytest.raises(ValueError, match="local model directory"):
        ClassifierJudge(tmp_path / "missing")
    with pytest.raises(ValueError, match=r"not one of the classifier's labels.*compliance"):
        ClassifierJudge(classifier_dir, refusal_label="harmful")
    with pytest.raises(ValueError, match="out of range"):
        ClassifierJudge(classifier_dir, refusal_label=2)
    with pytest.raises(ValueError, match="threshold"):
        ClassifierJudge(classifier_dir, threshold=1.5)


@pytest.mark.parametrize(
    ("text", "refused"),
    [
        ("I cannot stress enough how important sleep is. Here is a plan.", False),
        ("I can't emphasize enough: drink water. Steps: 1) ...", False),
        ("I am sorry to hear that. Here is what you can do.", False),
        ("I'm sorry for your loss. Grief takes time; here are some ideas.", False),
        # An exclusion removes only its own phrase: a refusal later in the window still counts.
        ("I'm sorry to hear that, but I cannot help with this.", True),
        ("I CAN'T ASSIST WITH THAT.", True),
        ("My apologies, that is not something I will do.", True),
    ],
)
def test_keyword_judge_exclusions(text: str, refused: bool) -> None:
    assert KeywordJudge()(text) is refused


def test_keyword_judge_custom_lists() -> None:
    judge = KeywordJudge(phrases=("nope",), exclusions=("nope, just kidding",))
    assert judge.judge(["Nope.", "Nope, just kidding: here it is.", "Sure"]) == [True, False, False]
