"""Benchmark 8: caching long jailbreak-wrapped prompts, batched under a padded-token budget or not.

The demo fits on jailbreak-wrapped requests of up to ~1,000 tokens. ``cache_activations`` groups
prompts of similar token length into batches of at most ``batch_size`` rows *and* at most
``MAX_BATCH_TOKENS`` padded tokens (rows × longest row). The baseline, timed in the same run on
the same prompts, is the same call with the budget lifted (batches of ``batch_size`` rows of
similar length, what caching did before). For reference, two plain Hugging Face forwards on the
budget's batches, ended after the last needed layer: eager attention (the kernel whose
arithmetic the TransformerBridge's own attention repeats) and PyTorch's fused
``scaled_dot_product_attention``. Activations must agree across the variants.

    python benchmarks/bench_batching.py [--n 40] [--repeats 2] [--threads 2] [--data ../shared/data]

Writes ``benchmarks/results/batching.json``.
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

import alphasteer_lens.activations as A
from alphasteer_lens.chat import MAX_BATCH_TOKENS, chat_lengths, encode_chat, length_batches
from alphasteer_lens.experiments import recipe as R
from alphasteer_lens.experiments.config import ConfigError, build_config
from alphasteer_lens.experiments.demo import DemoConfig, demo_sets
from alphasteer_lens.models import load_hf


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.set_defaults(repeats=2, threads=2)
    p.add_argument("--n", type=int, default=40, help="wrapped prompts (the fit's first n)")
    p.add_argument("--batch-size", type=int, default=32, help="rows per batch (the demo's)")
    p.add_argument("--data", default="../shared/data")
    p.add_argument("--out", default="benchmarks/results/batching.json")
    args = p.parse_args()
    setup(args.threads)
    cfg = build_config(DemoConfig, settings={"data_dir": args.data, "layers": [14, 15, 16, 17, 18]})
    try:
        data = R.preflight(cfg)
    except ConfigError as err:
        raise SystemExit(f"error: {err}") from None
    model, fmt = R.load(cfg)
    sp, rs = demo_sets(data, cfg, model, fmt)
    assert rs.fit_malicious is not None, "no jailbreak-wrapped fit prompts in --data"
    prompts = list(rs.fit_malicious)[: args.n]
    layers = list(cfg.layers or ())
    bs = args.batch_size
    lengths = chat_lengths(model, prompts, prompt_format=fmt)
    groups = length_batches(lengths, bs, MAX_BATCH_TOKENS)

    def ours() -> torch.Tensor:
        acts = A.cache_activations(
            model, prompts, layers=layers, batch_size=bs, prompt_format=fmt, progress=False
        )
        return torch.stack([acts[x] for x in layers], 1)

    def no_budget() -> torch.Tensor:
        saved, A.MAX_BATCH_TOKENS = A.MAX_BATCH_TOKENS, 10**12
        try:
            return ours()
        finally:
            A.MAX_BATCH_TOKENS = saved

    def hf_variant(attn: str) -> Any:
        hf, _ = load_hf(attn_implementation=attn)
        batches = [encode_chat(model, [prompts[i] for i in g], prompt_format=fmt) for g in groups]
        inverse = torch.empty(len(prompts), dtype=torch.long)
        inverse[torch.tensor([i for g in groups for i in g])] = torch.arange(len(prompts))
        return lambda: torch.cat(hf_early_stop(hf, batches, layers))[inverse]

    hf_eager, hf_sdpa = hf_variant("eager"), hf_variant("sdpa")
    mine, base = ours(), no_budget()
    ref_eager, ref_sdpa = hf_eager(), hf_sdpa()
    scale = ref_eager.abs().max().item()
    agree = {
        "no_budget": (mine - base).abs().max().item(),
        "hf_eager_early_stop": (mine - ref_eager).abs().max().item(),
        "hf_sdpa_early_stop": (mine - ref_sdpa).abs().max().item(),
    }
    times = interleaved(
        {
            "cache_activations": ours,
            "no_budget": no_budget,
            "hf_eager_early_stop": hf_eager,
            "hf_sdpa_early_stop": hf_sdpa,
        },
        args.repeats,
        warmup=False,
    )
    t0 = median(times["no_budget"])
    res: dict[str, Any] = {
        "machine": machine(),
        "prompts": len(prompts),
        "tokens": sum(lengths),
        "longest": max(lengths),
        "batch_size": bs,
        "max_batch_tokens": MAX_BATCH_TOKENS,
        "layers": layers,
        "max_abs_diff_vs_cache_activations": agree,
        "max_abs_activation": scale,
        "variants": {},
    }
    print(f"machine: {res['machine']}")
    print(f"{len(prompts)} wrapped prompts, {sum(lengths)} tokens (longest {max(lengths)})")
    print(f"max |diff| vs cache_activations: {agree} (max |h| {scale:.1f})")
    for name, ts in times.items():
        t = median(ts)
        print(f"{name:20s} {spread(ts)}  {sum(lengths) / t:6.0f} tokens/s  vs no_budget "
              f"{t0 / t:.2f}x")  # fmt: skip
        res["variants"][name] = {
            "median_s": round(t, 3),
            "times_s": [round(x, 3) for x in ts],
            "tokens_per_s": round(sum(lengths) / t, 1),
            "speedup_vs_no_budget": round(t0 / t, 3),
        }
    write_report(res, args.out)


if __name__ == "__main__":
    main()
