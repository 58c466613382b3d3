"""Benchmark 2: steered vs unsteered greedy generation through the same model object, and the
TransformerBridge's own overhead vs plain Hugging Face ``generate``.

Every variant generates exactly ``--new`` tokens per prompt (EOS does not stop it), so tokens/s
compare like with like. AlphaSteer and ActAdd steer the demo's five layers at the prompt
positions (the prefill pass), as in the demo.

    python benchmarks/bench_generation.py [--repeats 3] [--threads 1] [--n 8] [--new 16]
"""

from __future__ import annotations

import torch
from _common import interleaved, machine, median, parser, setup, spread

from alphasteer_lens import prompts as P
from alphasteer_lens.alphasteer import AlphaSteer
from alphasteer_lens.chat import encode_chat
from alphasteer_lens.models import load_hf, load_model
from alphasteer_lens.steering import ActAdd, steer


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.set_defaults(repeats=3)
    p.add_argument("--n", type=int, default=8, help="prompts (one batch)")
    p.add_argument("--new", type=int, default=16, help="new tokens per prompt")
    args = p.parse_args()
    setup(args.threads)
    layers = (14, 15, 16, 17, 18)
    model = load_model()
    hf, _ = load_hf(attn_implementation="eager")  # the bridge's attention kernel
    d = int(model.cfg.d_model)
    g = torch.Generator().manual_seed(0)
    alpha = AlphaSteer(
        layers, w=torch.randn(5, d, generator=g) / d, r=torch.randn(5, d, generator=g)
    )
    actadd = ActAdd(layers, torch.randn(5, d, generator=g))
    batch = encode_chat(model, list(P.mt_bench().sample(args.n, seed=0)))
    n_new = args.n * args.new

    def bridge(steering=None):  # type: ignore[no-untyped-def]
        def run() -> torch.Tensor:
            ctx = (
                steer(model, steering, 1.0, prompt=batch.prompt())
                if steering is not None
                else torch.no_grad()
            )
            with ctx, torch.no_grad():
                out = model.generate(
                    batch.tokens,
                    attention_mask=batch.attention_mask,
                    max_new_tokens=args.new,
                    do_sample=False,
                    use_past_kv_cache=True,
                    stop_at_eos=False,
                    return_type="tokens",
                    verbose=False,
                )
            assert out.shape[1] == batch.prompt_len + args.new
            return out

        return run

    @torch.no_grad()
    def plain_hf() -> torch.Tensor:
        out = hf.generate(
            input_ids=batch.tokens,
            attention_mask=batch.attention_mask,
            max_new_tokens=args.new,
            min_new_tokens=args.new,
            do_sample=False,
            pad_token_id=model.tokenizer.pad_token_id,
        )
        assert out.shape[1] == batch.prompt_len + args.new
        return out

    same = torch.equal(bridge()(), plain_hf())
    times = interleaved(
        {
            "bridge_unsteered": bridge(),
            "bridge_alphasteer": bridge(alpha),
            "bridge_actadd": bridge(actadd),
            "hf_generate": plain_hf,
        },
        args.repeats,
    )
    print(f"machine: {machine()}")
    print(f"{args.n} prompts x {args.new} new tokens, prompt width {batch.prompt_len}")
    print(f"bridge and HF greedy tokens identical: {same}")
    base = median(times["bridge_unsteered"])
    hf_t = median(times["hf_generate"])
    for name, ts in times.items():
        t = median(ts)
        print(
            f"{name:18s} {spread(ts)}  {n_new / t:6.1f} tokens/s  "
            f"vs bridge_unsteered {base / t:.3f}x  vs hf_generate {hf_t / t:.3f}x"
        )


if __name__ == "__main__":
    main()
