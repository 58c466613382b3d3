"""Benchmark 1: activation caching throughput vs a plain Hugging Face forward pass.

``cache_activations`` (last prompt token at ``blocks.{l}.hook_resid_pre`` for the demo's layers)
against the same model's Hugging Face forward on the same prompts, the same batches (the
toolkit's: similar token lengths under its padded-token budget), masks and position ids. The
headline baseline, ``hf_early_stop``, does what the toolkit does: forward pre-hooks on the needed
decoder layers keep their inputs, and the pass ends at the last needed layer (no later blocks,
no unembedding). ``hf_same_batches`` runs the whole model with ``output_hidden_states=True``;
``hf_given_order`` also feeds the prompts in their given order (no batching by length). Checks
that the activations are equal. Writes
``benchmarks/results/activations.json``.

    python benchmarks/bench_activations.py [--repeats 3] [--threads 1] [--n 32]
"""

from __future__ import annotations

from typing import Any

import torch
from _common import (
    hf_early_stop,
    interleaved,
    machine,
    median,
    parser,
    setup,
    spread,
    write_report,
)

from alphasteer_lens import prompts as P
from alphasteer_lens.activations import cache_activations
from alphasteer_lens.chat import MAX_BATCH_TOKENS, chat_lengths, encode_chat, length_batches
from alphasteer_lens.models import load_hf, load_model


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.set_defaults(repeats=3)
    p.add_argument("--n", type=int, default=32, help="prompts")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--layers", default="14,15,16,17,18")
    args = p.parse_args()
    setup(args.threads)
    layers = [int(x) for x in args.layers.split(",")]
    prompts = list(P.benign_instructions().sample(args.n, seed=0))
    model = load_model()
    # A separate copy (the bridge wraps its own HF modules in place), with the attention kernel
    # the bridge runs, so activations can be compared exactly.
    hf, _ = load_hf(attn_implementation="eager")
    bs = args.batch_size
    # the toolkit's own batches: similar token lengths under its padded-token budget
    groups = length_batches(chat_lengths(model, prompts), bs, MAX_BATCH_TOKENS)
    by_length = [i for g in groups for i in g]
    batches = [encode_chat(model, [prompts[i] for i in g]) for g in groups]
    given = [encode_chat(model, prompts[j : j + bs]) for j in range(0, len(prompts), bs)]
    n_tokens = sum(int(b.attention_mask.sum()) for b in batches)

    @torch.no_grad()
    def hf_forward(encoded: list[Any]) -> list[torch.Tensor]:
        out = []
        for b in encoded:
            pos = (b.attention_mask.cumsum(-1) - 1).clamp(min=0)
            hs = hf(
                input_ids=b.tokens,
                attention_mask=b.attention_mask,
                position_ids=pos,
                output_hidden_states=True,
            ).hidden_states
            out.append(torch.stack([hs[layer][:, -1] for layer in layers], 1))
        return out

    def ours() -> torch.Tensor:
        acts = cache_activations(model, prompts, layers=layers, batch_size=bs, progress=False)
        return torch.stack([acts[layer] for layer in layers], 1)

    # equality first (same rows, in the given order)
    mine = ours()
    ref = torch.cat(hf_forward(batches))
    inverse = torch.empty(len(prompts), dtype=torch.long)
    inverse[torch.tensor(by_length)] = torch.arange(len(prompts))
    ref = ref[inverse]
    diff = (mine - ref).abs().max().item()
    scale = ref.abs().max().item()
    early = torch.cat(hf_early_stop(hf, batches, layers))[inverse]

    times = interleaved(
        {
            "cache_activations": ours,
            "hf_early_stop": lambda: hf_early_stop(hf, batches, layers),
            "hf_same_batches": lambda: hf_forward(batches),
            "hf_given_order": lambda: hf_forward(given),
        },
        args.repeats,
    )
    print(f"machine: {machine()}")
    print(f"{len(prompts)} prompts, {n_tokens} tokens, batch {bs}, layers {layers}")
    print(
        f"activations equal: {torch.equal(mine, ref)} (max |diff| {diff:.2e}, max |h| {scale:.1f})"
    )
    print(f"hf_early_stop activations equal: {torch.equal(early, ref)}")
    base = median(times["hf_early_stop"])
    full = median(times["hf_same_batches"])
    res: dict[str, object] = {
        "machine": machine(),
        "prompts": len(prompts),
        "tokens": n_tokens,
        "batch_size": bs,
        "layers": layers,
        "activations_equal": torch.equal(mine, ref),
        "hf_early_stop_equal": torch.equal(early, ref),
        "variants": {},
    }
    for name, ts in times.items():
        t = median(ts)
        print(
            f"{name:18s} {spread(ts)}  {len(prompts) / t:6.1f} prompts/s  "
            f"{n_tokens / t:7.0f} tokens/s  vs hf_early_stop {base / t:.2f}x  "
            f"(vs hf_same_batches {full / t:.2f}x)"
        )
        res["variants"][name] = {  # type: ignore[index]
            "median_s": round(t, 4),
            "times_s": [round(x, 4) for x in ts],
            "prompts_per_s": round(len(prompts) / t, 2),
            "tokens_per_s": round(n_tokens / t, 1),
            "speedup_vs_hf_early_stop": round(base / t, 3),
            "speedup_vs_hf_same_batches": round(full / t, 3),
        }
    write_report(res, "benchmarks/results/activations.json")


if __name__ == "__main__":
    main()
