"""Benchmark: steered greedy ``generate`` through plain transformers hooks
(:func:`alphasteer_lens.deploy.attach`) vs the TransformerBridge (:func:`steer`), on SmolLM2.

Every variant generates exactly ``--new`` tokens per prompt (EOS does not stop it), so tokens/s
compare like with like. AlphaSteer and ActAdd steer the demo's five layers at the prompt
positions; their greedy tokens are checked to be the same on both paths (up to the first EOS).

    python benchmarks/bench_deploy.py [--repeats 3] [--threads 1] [--n 8] [--new 16] [--quick]
"""

from __future__ import annotations

from typing import Any

import torch
from _common import interleaved, machine, median, parser, setup, spread

from alphasteer_lens import prompts as P
from alphasteer_lens.alphasteer import AlphaSteer
from alphasteer_lens.chat import encode_chat
from alphasteer_lens.deploy import attach
from alphasteer_lens.models import load_hf, load_model
from alphasteer_lens.steering import ActAdd, steer


def _until_eos(tokens: torch.Tensor, start: int, eos: int) -> list[list[int]]:
    rows = tokens[:, start:].tolist()
    return [r[: r.index(eos)] if eos in r else r for r in rows]


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.set_defaults(repeats=3)
    p.add_argument("--n", type=int, default=8, help="prompts (one batch)")
    p.add_argument("--new", type=int, default=16, help="new tokens per prompt")
    p.add_argument("--quick", action="store_true", help="2 prompts, 4 tokens, 1 repeat")
    args = p.parse_args()
    if args.quick:
        args.n, args.new, args.repeats = 2, 4, 1
    setup(args.threads)
    layers = (14, 15, 16, 17, 18)
    model = load_model()
    hf, _ = load_hf(attn_implementation="eager")  # the bridge's attention kernel
    d = int(model.cfg.d_model)
    g = torch.Generator().manual_seed(0)
    steerings = {
        "alphasteer": AlphaSteer(
            layers, w=torch.randn(5, d, generator=g) / d, r=torch.randn(5, d, generator=g)
        ),
        "actadd": ActAdd(layers, torch.randn(5, d, generator=g)),
    }
    batch = encode_chat(model, list(P.mt_bench().sample(args.n, seed=0)))
    eos = int(model.tokenizer.eos_token_id)
    width = batch.prompt_len

    def bridge(steering: Any = None) -> Any:
        @torch.no_grad()
        def run() -> torch.Tensor:
            ctx: Any = (
                steer(model, steering, 1.0, prompt=batch.prompt())
                if steering is not None
                else torch.no_grad()
            )
            with ctx:
                out = model.generate(
                    batch.tokens, attention_mask=batch.attention_mask,
                    max_new_tokens=args.new, do_sample=False, use_past_kv_cache=True,
                    stop_at_eos=False, return_type="tokens", verbose=False,
                )  # fmt: skip
            assert out.shape[1] == width + args.new
            return out

        return run

    def plain(steering: Any = None) -> Any:
        @torch.no_grad()
        def run() -> torch.Tensor:
            ctx: Any = attach(hf, steering, 1.0) if steering is not None else torch.no_grad()
            with ctx:
                out = hf.generate(
                    input_ids=batch.tokens, attention_mask=batch.attention_mask,
                    max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False,
                    pad_token_id=model.tokenizer.pad_token_id,
                )  # fmt: skip
            assert out.shape[1] == width + args.new
            return out

        return run

    same = {
        name: _until_eos(bridge(s)(), width, eos) == _until_eos(plain(s)(), width, eos)
        for name, s in {"unsteered": None, **steerings}.items()
    }
    variants = {"bridge_unsteered": bridge(), "hf_unsteered": plain()}
    for name, s in steerings.items():
        variants |= {f"bridge_{name}": bridge(s), f"hf_{name}": plain(s)}
    times = interleaved(variants, args.repeats)
    n_new = args.n * args.new
    print(f"machine: {machine()}")
    print(f"{args.n} prompts x {args.new} new tokens, prompt width {width}")
    print(f"greedy tokens identical, bridge vs plain-HF hooks: {same}")
    for name, ts in times.items():
        print(f"{name:20s} {spread(ts)}  {n_new / median(ts):6.1f} tokens/s")
    for name in ("unsteered", *steerings):
        ratio = median(times[f"bridge_{name}"]) / median(times[f"hf_{name}"])
        print(f"{name}: plain-HF hooks are {ratio:.2f}x the bridge's speed")


if __name__ == "__main__":
    main()
