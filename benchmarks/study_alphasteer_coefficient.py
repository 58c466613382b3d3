"""Why does AlphaSteer miss GCG-wrapped harm that ActAdd refuses? Its steering coefficient.

AlphaSteer adds ``λ · s_l · r_l`` with ``s_l = h_last · w_l``: how far it pushes a prompt toward
refusal is its own score, fitted to be ≈ 1 on malicious and ≈ 0 on benign fit prompts. ActAdd adds
``λ · r_l`` whatever the prompt. This study reads ``s_l`` of a finished demo's artifact on the
vanilla (unsteered) activations of its held-out test columns, per jailbreak family, so a column
whose coefficient is small, or negative (a push *away* from refusal), shows up directly.

    python benchmarks/study_alphasteer_coefficient.py --run results/demo_layers14-18 \
        --out results/alphasteer_coefficient

Reads the run's ``alphasteer.safetensors``, ``generations.csv`` (its test prompts and jailbreak
wrappings), ``report.json`` (prompt format) and ``manifest.json`` (model); one forward pass per
test prompt to the last steered layer (≈ 1 min on two cores for SmolLM2). Writes ``report.json``
and ``report.csv`` under ``--out``: per column (and family), the number of prompts, the mean
``s_l`` per steered layer, the mean over layers, and the share of prompts whose mean is < 0.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from _common import setup

from alphasteer_lens.activations import cache_activations
from alphasteer_lens.alphasteer import AlphaSteer
from alphasteer_lens.artifacts import load_steering
from alphasteer_lens.formats import PromptFormat
from alphasteer_lens.models import load_model, model_name
from alphasteer_lens.storage import atomic_write_bytes, atomic_write_json


def groups(gens: pd.DataFrame) -> dict[str, list[str]]:
    """The vanilla rows' prompts per test column, and the jailbreak column per family."""
    v = gens[gens.method == "vanilla"]
    out = {col: list(v[v.set == col].prompt) for col in dict.fromkeys(v.set)}
    jail = v[v.set == "jailbreak"]
    for family in sorted(set(jail.wrapping.str.split("/").str[0])):
        out[f"jailbreak/{family}"] = list(jail[jail.wrapping.str.startswith(family + "/")].prompt)
    return out


def coefficient_rows(
    model: Any, steering: AlphaSteer, sets: dict[str, list[str]], fmt: PromptFormat
) -> list[dict[str, Any]]:
    layers = list(steering.layers)
    rows = []
    for name, prompts in sets.items():
        acts = cache_activations(
            model, prompts, layers=layers, prompt_format=fmt, desc=name, batch_size=16
        )
        s = torch.stack([steering.malicious_scores(x, acts[x]).double() for x in layers], 1)
        row: dict[str, Any] = {"set": name, "n": len(prompts)}
        row |= {f"s_L{x}": float(s[:, i].mean()) for i, x in enumerate(layers)}
        row |= {"s_mean": float(s.mean()), "negative_share": float((s.mean(1) < 0).double().mean())}
        rows.append(row)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", required=True, help="a finished demo's output directory")
    p.add_argument("--out", default="results/alphasteer_coefficient")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    setup(args.threads)
    run = Path(args.run)
    manifest = json.loads((run / "manifest.json").read_text("utf-8"))
    report = json.loads((run / "report.json").read_text("utf-8"))
    model = load_model(manifest["config"].get("model"))
    steering = load_steering(run / "alphasteer.safetensors", model=model)
    if not isinstance(steering, AlphaSteer):
        raise SystemExit(f"{run / 'alphasteer.safetensors'} holds no AlphaSteer")
    gens = pd.read_csv(run / "generations.csv", keep_default_na=False)
    fmt = PromptFormat.from_json(report["prompt_format"])
    rows = coefficient_rows(model, steering, groups(gens), fmt)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(
        {"model": model_name(model), "run": str(run), "layers": list(steering.layers),
         "rows": rows},
        out / "report.json",
    )  # fmt: skip
    df = pd.DataFrame(rows)
    atomic_write_bytes(df.to_csv(index=False, float_format="%.6g").encode(), out / "report.csv")
    print(df.to_string(index=False, float_format=lambda x: f"{x:.3f}"))


if __name__ == "__main__":
    main()
