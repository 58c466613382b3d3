"""Benchmark 7: a gated row's answers, all prompts generated through the hooks vs only the
prompts its gate opens for (the others take vanilla's answer, which the demo has anyway).

Like for like: the same calibrated AlphaSteer (the committed demo's artifact, probe, τ and λ
from ``results/demo_layers14-18``), the same benign prompts (the demo's MT-Bench and
sensitive-but-safe test columns), ``--new`` greedy tokens, batch size 32 under the same token
budget. ``all``: every prompt generated with the gated steering. ``skip``: one caching pass
(last token and prompt mean at layers 14–18) to decide which prompts the gate opens for, then
only those generated. Both give the same answers (checked each run); vanilla's answers are not
timed (the demo generates them for its vanilla row either way).

    python benchmarks/bench_gated_skip.py [--repeats 3] [--threads 2] [--new 24]

Writes ``benchmarks/results/gated_skip.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
from _common import interleaved, machine, median, parser, setup, spread

from alphasteer_lens.activations import cache_activations
from alphasteer_lens.alphasteer import AlphaSteer
from alphasteer_lens.artifacts import load_steering
from alphasteer_lens.gates import CalibratedAlphaSteer, GateProbe, fired
from alphasteer_lens.generation import generate
from alphasteer_lens.models import load_model

RUN = Path("results/demo_layers14-18")


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.set_defaults(repeats=3, threads=2)
    p.add_argument("--new", type=int, default=24, help="new tokens per prompt")
    args = p.parse_args()
    setup(args.threads)
    model = load_model()
    base = load_steering(RUN / "alphasteer.safetensors", model=model)
    assert isinstance(base, AlphaSteer)
    report = json.loads((RUN / "report.json").read_text())
    layers = list(base.layers)
    probe, _ = GateProbe.load(
        RUN / "gate_probe.safetensors", layers=layers, d_model=int(model.cfg.d_model)
    )
    gate = report["gate"]
    gated = CalibratedAlphaSteer(base, tau=gate["tau"], margin=gate["margin"], probe=probe)
    lam = float(report["calibrated_strength"])
    gens = pd.read_csv(RUN / "generations.csv", keep_default_na=False)
    v = gens[(gens.method == "vanilla") & gens.set.isin(["benign", "sensitive"])]
    prompts = list(v.prompt)
    kw = {"max_new_tokens": args.new, "batch_size": 32, "progress": False}
    vanilla = generate(model, prompts, **kw)  # not timed: the demo's vanilla row

    def run_all() -> list[str]:
        return generate(model, prompts, steering=gated, strength=lam, **kw)

    def opened() -> list[int]:
        acts = cache_activations(
            model, prompts, layers=layers, positions=probe.reads, batch_size=32, progress=False
        )
        return fired(gated, {x: acts[x].double() for x in layers}).nonzero().flatten().tolist()

    def run_skip() -> list[str]:
        run, out = opened(), list(vanilla)
        got = generate(model, [prompts[i] for i in run], steering=gated, strength=lam, **kw)
        for j, i in enumerate(run):
            out[i] = got[j]
        return out

    assert run_all() == run_skip(), "skipping shut prompts changed an answer"  # and warm-up
    times = interleaved({"all": run_all, "skip": run_skip}, args.repeats, warmup=False)
    res = {
        "machine": machine(),
        "prompts": len(prompts),
        "opened": len(opened()),
        "new_tokens": args.new,
        "seconds_all": times["all"],
        "seconds_skip": times["skip"],
        "speedup": median(times["all"]) / median(times["skip"]),
        "answers_identical": True,
    }
    out = Path("benchmarks/results/gated_skip.json")
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"{machine()}\n{len(prompts)} benign prompts, gate open for {res['opened']}")
    print(f"all:  {spread(times['all'])}\nskip: {spread(times['skip'])}")
    print(f"skip is {res['speedup']:.1f}x faster; answers identical")


if __name__ == "__main__":
    main()
