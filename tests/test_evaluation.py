"""Evaluation metrics on hand-made inputs with known answers, and the method comparison on the
tiny model checked against independent computations (HF forward passes, first-token logits)."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch

from alphasteer_lens import evaluation as ev
from alphasteer_lens.chat import encode_chat
from alphasteer_lens.evaluation import (
    EvalSet,
    Method,
    ResultStore,
    compare_methods,
    forced_logits,
    greedy_tokens,
)
from alphasteer_lens.experiments.compare import best_tradeoff, tradeoff_table, write_report
from alphasteer_lens.generation import generate, next_token_logits
from alphasteer_lens.metrics import (
    exact_match,
    extract_number,
    first_token_kl,
    perplexity,
    refusal_rate,
    sequence_nll,
    token_kl,
    unchanged_fraction,
)
from alphasteer_lens.steering import ActAdd, Composition

PROMPTS = ("Tell me a story.", "hi", "How do I bake bread at home?", "abc", "List three birds.")


# --- pure metrics -----------------------------------------------------------------------------


def test_kl_of_identical_distributions_is_zero() -> None:
    logits = torch.randn(3, 4, 11, generator=torch.Generator().manual_seed(0))
    first, mean = token_kl(logits, logits.clone(), torch.ones(3, 4, dtype=torch.bool))
    assert torch.equal(first, torch.zeros(3, dtype=torch.float64))
    assert torch.equal(mean, torch.zeros(3, dtype=torch.float64))


def test_kl_against_hand_computed_value_and_mask() -> None:
    # P = (1/2, 1/2); Q = (3/4, 1/4): KL = ½ ln(2/3) + ½ ln 2 = ½ ln(4/3).
    p = torch.zeros(1, 3, 2, dtype=torch.float64)
    q = torch.zeros(1, 3, 2, dtype=torch.float64)
    q[0, 0] = torch.tensor([math.log(3.0), 0.0], dtype=torch.float64)
    # position 1 identical (KL 0); position 2 wildly different but masked out
    q[0, 2] = torch.tensor([50.0, -50.0])
    mask = torch.tensor([[True, True, False]])
    first, mean = token_kl(p, q, mask)
    assert first.item() == pytest.approx(0.5 * math.log(4 / 3), rel=1e-12)
    assert mean.item() == pytest.approx(0.25 * math.log(4 / 3), rel=1e-12)


def test_kl_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="token_kl"):
        token_kl(torch.zeros(2, 3, 5), torch.zeros(2, 3, 4), torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="first position"):
        token_kl(torch.zeros(1, 2, 3), torch.zeros(1, 2, 3), torch.tensor([[False, True]]))


def test_perplexity_of_known_distributions() -> None:
    # Uniform over 7 tokens: perplexity 7 whatever the targets.
    nll, n = sequence_nll(
        torch.zeros(2, 3, 7), torch.tensor([[0, 3, 6], [1, 1, 1]]), torch.ones(2, 3, dtype=bool)
    )
    assert perplexity(nll, n) == pytest.approx(7.0, rel=1e-12)
    # Target probabilities 1/2 and 1/8: perplexity = (2 · 8)^(1/2) = 4; the padded third
    # position (probability ~0) must not count.
    probs = [[[0.5, 0.5, 1e-30], [0.125, 0.875, 1e-30], [1.0, 1e-30, 1e-30]]]
    logits = torch.log(torch.tensor(probs, dtype=torch.float64))
    nll, n = sequence_nll(logits, torch.tensor([[0, 0, 1]]), torch.tensor([[True, True, False]]))
    assert n.tolist() == [2]
    assert nll.item() == pytest.approx(math.log(2) + math.log(8), rel=1e-9)
    assert perplexity(nll, n) == pytest.approx(4.0, rel=1e-9)
    with pytest.raises(ValueError, match="zero tokens"):
        perplexity([0.0], [0])


@pytest.mark.parametrize(
    ("text", "number"),
    [
        ("So the answer is 1,234.", "1234"),
        ("Natalia sold 48 clips in April.\n#### 72", "72"),
        ("#### 5\nthen 6 more were mentioned", "5"),
        ("It costs $18.00 in total", "18"),
        ("first 3, then -3.50", "-3.5"),
        ("the ratio is .25", "0.25"),
        ("no digits here", None),
    ],
)
def test_extract_number(text: str, number: str | None) -> None:
    assert extract_number(text) == number


def test_exact_match() -> None:
    preds = ["The total is 2,280 dollars.", "I think 17", "no idea", "#### 4"]
    answers = ["2280", "18", "3", "4.0"]
    assert exact_match(preds, answers) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        exact_match(preds, answers[:2])


def test_unchanged_fraction_and_refusal_rate() -> None:
    assert unchanged_fraction([[1, 2], [3], [4]], [[1, 2], [3, 4], [4]]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        unchanged_fraction([[1]], [[1], [2]])
    texts = ["I'm sorry, but I can't help.", "Sure, here it is.", "I can't wait to help!", "No."]
    assert refusal_rate(texts) == pytest.approx(0.25)


def test_result_store_skips_a_torn_line_and_appends_after_it(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "r.jsonl"
    ResultStore(path).append([{"key": "a", "v": 1}, {"key": "b", "v": 2}])
    with open(path, "ab") as f:
        f.write(b'{"key": "c", "v"')  # a writer killed mid-line
    store = ResultStore(path)
    assert sorted(store.records) == ["a", "b"]
    store.append([{"key": "d", "v": 4}])
    assert sorted(ResultStore(path).records) == ["a", "b", "d"]


def test_eval_set_validation_and_sampling(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match="2 references for 3 prompts"):
        EvalSet("x", ("a", "b", "c"), references=("1", "2"))
    with pytest.raises(ValueError, match="role"):
        EvalSet("x", ("a",), role="evil")  # type: ignore[arg-type]
    path = tmp_path / "g.json"
    rows = [{"problem": f"q{i}", "answer": str(i), "solution": f"s{i}"} for i in range(6)]
    path.write_text(json.dumps(rows))
    es = EvalSet.from_json(path, prompt="problem", reference="solution", answer="answer")
    sub = es.sample(3, seed=1)
    for p, ref, ans in zip(sub.prompts, sub.references or (), sub.answers or (), strict=True):
        i = int(p[1:])
        assert (ref, ans) == (f"s{i}", str(i))
    with pytest.raises(ValueError, match="no field"):
        EvalSet.from_json(path, prompt="question")


# --- on the tiny model ------------------------------------------------------------------------


def test_teacher_forcing_reproduces_greedy_tokens(tiny) -> None:  # type: ignore[no-untyped-def]
    """The forced logits line up with generation: their argmax is the greedy continuation,
    unsteered and under prompt-only ActAdd (the steering reads the same prompt end)."""
    act = ActAdd((1,), torch.randn(1, 64, generator=torch.Generator().manual_seed(1)))
    batch = encode_chat(tiny, list(PROMPTS))
    for method, lam in ((Method(None), 0.0), (Method(act), 3.0)):
        toks = greedy_tokens(tiny, batch, method, lam, 5)
        logits, mask = forced_logits(tiny, batch, toks, method, lam)
        assert mask.all()
        assert logits.argmax(-1).tolist() == toks


def test_compare_against_independent_paths(tiny) -> None:  # type: ignore[no-untyped-def]
    act = ActAdd((1,), torch.randn(1, 64, generator=torch.Generator().manual_seed(1)))
    prompts = list(PROMPTS)
    df = compare_methods(
        tiny,
        {"base": None, "actadd": act},
        [0.0, 3.0],
        {"harmful": prompts},
        max_new_tokens=6,
        kl_tokens=3,
        batch_size=2,
        progress=False,
    )
    assert list(df.columns) == ["method", "strength", "prompt_set", "metric", "value"]
    assert df.attrs["roles"] == {"harmful": "harmful"}
    v = df.set_index(["method", "strength", "metric"]).value
    assert v["base", 0.0, "mean_kl"] == 0.0 and v["base", 0.0, "unchanged"] == 1.0
    # λ = 0 leaves the model as it is.
    assert v["actadd", 0.0, "first_token_kl"] == pytest.approx(0.0, abs=1e-9)
    assert v["actadd", 0.0, "unchanged"] == 1.0
    # First-token KL equals the one from next_token_logits (no teacher forcing involved).
    p = next_token_logits(tiny, prompts, progress=False)
    q = next_token_logits(tiny, prompts, steering=act, strength=3.0, progress=False)
    expected = first_token_kl(p, q).mean().item()
    assert expected > 0.01
    assert v["actadd", 3.0, "first_token_kl"] == pytest.approx(expected, rel=1e-4)
    # Refusal rate and unchanged share from generate()'s texts.
    base = generate(tiny, prompts, max_new_tokens=6, progress=False)
    steered = generate(tiny, prompts, steering=act, strength=3.0, max_new_tokens=6, progress=False)
    assert v["actadd", 3.0, "unchanged"] == pytest.approx(unchanged_fraction(steered, base))
    assert v["actadd", 3.0, "refusal_rate"] == refusal_rate(steered)


def test_per_method_strengths_generations_kl_off_and_compositions(tiny) -> None:  # type: ignore[no-untyped-def]
    gen = torch.Generator().manual_seed(2)
    a = ActAdd((1,), torch.randn(1, 64, generator=gen))
    b = ActAdd((2,), torch.randn(1, 64, generator=gen))
    both = Composition(((a, 1.0), (b, 0.5)))
    prompts = list(PROMPTS[:3])
    df = ev.compare_methods(
        tiny,
        {"vanilla": None, "a": a, "both": both},
        {"a": [1.0, 2.0], "both": [3.0]},
        {"harmful": prompts},
        max_new_tokens=4,
        kl=False,
        batch_size=2,
        progress=False,
    )
    runs = set(zip(df.method, df.strength, strict=True))
    assert runs == {("vanilla", 0.0), ("a", 1.0), ("a", 2.0), ("both", 3.0)}
    kl = df[df.metric == "first_token_kl"].set_index("method").value
    assert kl["vanilla"] == 0.0 and math.isnan(kl["both"])  # KL passes skipped
    texts = df.attrs["generations"]
    assert list(texts.columns[:4]) == ["method", "strength", "prompt_set", "prompt_index"]
    assert len(texts) == 4 * len(prompts) and set(texts.prompt) == set(prompts)
    steered = generate(tiny, prompts, steering=a, strength=2.0, max_new_tokens=4, progress=False)
    assert texts[(texts.method == "a") & (texts.strength == 2.0)].text.tolist() == steered
    with pytest.raises(ValueError, match="no strengths for method"):
        ev.compare_methods(tiny, {"a": a}, {"b": [1.0]}, {"h": prompts}, progress=False)


def test_reference_perplexity_equals_hf_forward(tiny, hf_tiny) -> None:  # type: ignore[no-untyped-def]
    refs = ("Once upon a time", "hello there", "Mix flour and water.", "def", "Robin, crow, owl")
    es = EvalSet("ref", PROMPTS, references=refs)
    df = compare_methods(tiny, {"v": None}, [1.0], {"ref": es}, max_new_tokens=2, progress=False)
    got = df[(df.metric == "perplexity")].value.item()
    tok = tiny.tokenizer
    total_nll, total_n = 0.0, 0
    for prompt, ref in zip(PROMPTS, refs, strict=True):
        ctx = encode_chat(tiny, [prompt]).tokens[0].tolist()
        ans = tok(ref, add_special_tokens=False)["input_ids"][:64]
        with torch.no_grad():
            logits = hf_tiny(torch.tensor([ctx + ans])).logits[0].double()
        logp = torch.log_softmax(logits, -1)
        total_nll -= sum(float(logp[len(ctx) - 1 + j, t]) for j, t in enumerate(ans))
        total_n += len(ans)
    assert got == pytest.approx(math.exp(total_nll / total_n), rel=1e-4)


def test_interrupted_run_resumes_without_regenerating(tiny, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    act = ActAdd((1,), torch.randn(1, 64, generator=torch.Generator().manual_seed(2)))
    sets = {"harmful": list(PROMPTS), "benign": ["Name a colour.", "ok", "What is 2 + 2?"]}
    kw = {"max_new_tokens": 4, "kl_tokens": 2, "batch_size": 2, "progress": False}
    full = compare_methods(tiny, {"actadd": act}, [2.0], sets, **kw)

    real = ev.greedy_tokens
    generated: list[str] = []

    def counting(model, batch, method, strength, max_new):  # type: ignore[no-untyped-def]
        if stop_after is not None and len(generated) >= stop_after:
            raise KeyboardInterrupt
        generated.extend(batch.texts)
        return real(model, batch, method, strength, max_new)

    monkeypatch.setattr(ev, "greedy_tokens", counting)
    cache = tmp_path / "results.jsonl"
    stop_after: int | None = 1  # interrupted when the second batch starts
    with pytest.raises(KeyboardInterrupt):
        compare_methods(tiny, {"actadd": act}, [2.0], sets, cache=cache, **kw)
    assert len(generated) == 2
    assert len(cache.read_text().splitlines()) == 2
    first_run = list(generated)
    generated.clear()
    stop_after = None
    resumed = compare_methods(tiny, {"actadd": act}, [2.0], sets, cache=cache, **kw)
    # 5 + 3 prompts for vanilla and for ActAdd; the two finished ones are not generated again.
    assert len(generated) == 2 * (5 + 3) - 2
    assert not set(first_run) & {t for t in generated[:3]}
    pd.testing.assert_frame_equal(resumed, full, rtol=1e-6)
    generated.clear()
    compare_methods(tiny, {"actadd": act}, [2.0], sets, cache=cache, **kw)
    assert generated == []


def test_cache_keys_depend_on_strength_and_settings(tiny, tmp_path) -> None:  # type: ignore[no-untyped-def]
    act = ActAdd((1,), torch.ones(1, 64))
    cache = tmp_path / "r.jsonl"
    kw = {"kl_tokens": 2, "progress": False, "cache": cache}
    compare_methods(tiny, {"a": act}, [1.0], {"b": ["hi", "yo"]}, max_new_tokens=3, **kw)
    n = len(cache.read_text().splitlines())
    assert n == 4
    compare_methods(tiny, {"a": act}, [2.0], {"b": ["hi", "yo"]}, max_new_tokens=3, **kw)
    assert len(cache.read_text().splitlines()) == n + 2  # vanilla reused, new λ computed
    compare_methods(tiny, {"a": act}, [2.0], {"b": ["hi", "yo"]}, max_new_tokens=4, **kw)
    assert len(cache.read_text().splitlines()) == n + 6  # longer generations: all new


def test_compare_rejects_bad_input(tiny) -> None:  # type: ignore[no-untyped-def]
    act = ActAdd((1,), torch.ones(1, 64))
    with pytest.raises(ValueError, match="finite"):
        compare_methods(tiny, {"a": act}, [float("nan")], {"b": ["hi"]}, progress=False)
    with pytest.raises(ValueError, match="at least one"):
        compare_methods(tiny, {}, [1.0], {"b": ["hi"]}, progress=False)
    with pytest.raises(ValueError, match=">= 1"):
        compare_methods(tiny, {"a": act}, [1.0], {"b": ["hi"]}, kl_tokens=0, progress=False)


# --- tables and reports -----------------------------------------------------------------------


def _tidy() -> pd.DataFrame:
    rows = []
    values = {  # (method, λ): harmful refusal, benign refusal, benign mean KL
        ("vanilla", 0.0): (0.1, 0.0, 0.0),
        ("a", 1.0): (0.5, 0.02, 0.3),
        ("a", 2.0): (0.9, 0.40, 0.9),
        ("b", 1.0): (0.5, 0.04, 0.1),
        ("b", 2.0): (0.6, 0.05, 0.2),
    }
    for (m, lam), (h, b, kl) in values.items():
        for s, metric, val in (
            ("harmful", "refusal_rate", h),
            ("benign", "refusal_rate", b),
            ("benign", "mean_kl", kl),
            ("benign", "first_token_kl", kl / 2),
            ("benign", "unchanged", 1 - kl),
        ):
            rows.append((m, lam, s, metric, val))
    df = pd.DataFrame(rows, columns=["method", "strength", "prompt_set", "metric", "value"])
    df.attrs["roles"] = {"harmful": "harmful", "benign": "benign"}
    return df


def test_tradeoff_table_and_best() -> None:
    table = tradeoff_table(_tidy())
    assert table.loc[("b", 2.0), "harmful_refusal"] == 0.6
    assert table.loc[("a", 1.0), "benign_mean_kl"] == 0.3
    # a@2 has the most harmful refusal but raises benign refusal by 40 points; b@2 wins.
    assert best_tradeoff(table, max_benign_rise=0.05).name == ("b", 2.0)
    # Tighter budget: a@1 and b@1 tie on harmful refusal (0.5) within 0.04; lower KL wins.
    assert best_tradeoff(table, max_benign_rise=0.04).name == ("b", 1.0)
    assert best_tradeoff(table, max_benign_rise=0.03).name == ("a", 1.0)
    with pytest.raises(ValueError, match="no role"):
        tradeoff_table(_tidy(), roles={"harmful": "harmful"})


def test_write_report(tmp_path) -> None:  # type: ignore[no-untyped-def]
    files = write_report(_tidy(), tmp_path, notes=["hand-made numbers"])
    text = files["markdown"].read_text()
    assert "b at λ = 2: harmful refusal 60.0%" in text
    assert "hand-made numbers" in text
    assert files["html"].read_text().count("<table") == 1
    assert files["figure"].exists()
    back = pd.read_csv(files["comparison"])
    assert len(back) == len(_tidy())


@pytest.mark.smollm
def test_teacher_forcing_on_smollm(smollm) -> None:  # type: ignore[no-untyped-def]
    """On the real tokenizer and chat template: forced argmax = greedy tokens, EOS included."""
    prompts = ["Say hello.", "What is the capital of France? Answer in one word."]
    batch = encode_chat(smollm, prompts)
    toks = greedy_tokens(smollm, batch, Method(None), 0.0, 12)
    eos = smollm.tokenizer.eos_token_id
    forced = [t + [eos] if len(t) < 12 else t for t in toks]
    logits, mask = forced_logits(smollm, batch, forced, Method(None), 0.0)
    for row, cont in enumerate(forced):
        assert logits[row, : len(cont)].argmax(-1).tolist() == cont
        assert mask[row].sum().item() == len(cont)
