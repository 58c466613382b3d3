"""The demo's compute floor: the forward-pass arithmetic each step must do, against its time.

For a committed demo run (``--run DIR``: its ``report.json`` and ``generations.csv``), rebuild
the demo's prompt sets, count each prompt's chat-formatted tokens, and add up the floating-point
work of every forward pass each step makes:

- per token and block, ``2 × (the block's weight-matrix entries)`` (the linear layers);
- per sequence of ``n`` tokens and block, ``4 n² · n_heads · d_head`` (scores and values over the
  full square, as the eager attention kernel computes it); a generated token at context ``c``
  adds ``4 c · n_heads · d_head``;
- ``2 · d_model · d_vocab`` per unembedded position (the last prompt position, each new token).

Caching passes stop at the last needed layer (``max(layers)`` blocks for ``resid_pre``); scoring
and generation run every block. Generation counts ``max_new_tokens − 1`` one-token steps per
prompt after the prefill (rows of a batch stop together). What the floor leaves out — the
probe's logistic regressions, tokenising, Python and hook overhead, padding, memory traffic —
only makes the real time longer, so ``floor_s`` is a lower bound on each step's time.

The machine's rate is measured in the same run: the best float32 matrix product rate over a few
shapes of the model's own MLP (``[M, d_model] × [d_model, d_mlp]``), with the demo's thread count.
``shared_floor_s`` is the floor if every steered pass reused the vanilla pass's blocks below the
first steered layer (a prefix shared across methods and strengths; the PCA view's vanilla pass
taken from the test-gate cache). Writes ``benchmarks/results/demo_floor.json``.

    python benchmarks/demo_floor.py [--run results/demo_layers14-18] [--threads 2]
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from _common import machine, parser, setup, write_report

from alphasteer_lens.chat import chat_lengths
from alphasteer_lens.experiments import recipe as R
from alphasteer_lens.experiments.config import build_config
from alphasteer_lens.experiments.demo import DemoConfig, demo_sets

AIM_S = 300.0


def gemm_rate(d_model: int, d_mlp: int, rounds: int = 10) -> float:
    """Best float32 GFLOP/s over the MLP's matrix product at a few row counts."""
    best = 0.0
    w = torch.randn(d_model, d_mlp)
    for m in (512, 2048, 8192):
        x = torch.randn(m, d_model)
        for _ in range(2):
            x @ w
        start = time.perf_counter()
        for _ in range(rounds):
            x @ w
        best = max(best, 2 * m * d_model * d_mlp * rounds / (time.perf_counter() - start) / 1e9)
    return best


class Work:
    """FLOPs of forward passes on the model whose shape is given."""

    def __init__(self, model: Any) -> None:
        cfg = model.cfg
        seen: set[int] = set()
        entries = 0
        for p in model.blocks[0].parameters():
            if p.dim() == 2 and p.data_ptr() not in seen:
                seen.add(p.data_ptr())
                entries += p.numel()
        self.block_linear = 2 * entries  # per token and block
        self.d_attn = int(cfg.n_heads) * int(cfg.d_head)
        self.unembed = 2 * int(cfg.d_model) * int(cfg.d_vocab)
        self.n_layers = int(cfg.n_layers)

    def prefill(self, lengths: Sequence[int], blocks: int, *, unembed: bool) -> float:
        """Passes over whole prompts through ``blocks`` blocks (the last position unembedded)."""
        per_block = sum(n * self.block_linear + 4 * n * n * self.d_attn for n in lengths)
        return blocks * per_block + (self.unembed * len(lengths) if unembed else 0)

    def decode(self, lengths: Sequence[int], steps: int) -> float:
        """``steps`` one-token passes after each prompt's prefill (every block, unembedded)."""
        total = 0.0
        for n in lengths:
            for k in range(steps):
                total += self.n_layers * (self.block_linear + 4 * (n + k + 1) * self.d_attn)
                total += self.unembed
        return total


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.set_defaults(threads=2)
    p.add_argument("--run", default="results/demo_layers14-18", help="a committed demo run")
    p.add_argument("--out", default="benchmarks/results/demo_floor.json")
    args = p.parse_args()
    setup(args.threads)
    run = Path(args.run)
    for name in ("report.json", "generations.csv"):
        if not (run / name).is_file():
            raise SystemExit(f"--run {run}: no {name} there (pass a finished demo run's folder)")
    try:
        report = json.loads((run / "report.json").read_text())
    except ValueError as err:
        raise SystemExit(f"--run {run}: report.json is not valid JSON ({err})") from None
    need = ("config", "layers", "timings", "validation_sweep", "seconds")
    missing = [k for k in need if not isinstance(report, dict) or k not in report]
    if missing:
        raise SystemExit(f"--run {run}: report.json lacks {missing} (not a demo report?)")
    cfg = build_config(DemoConfig, settings=report["config"])
    data = R.preflight(cfg)
    model, fmt = R.load(cfg)
    sp, rs = demo_sets(data, cfg, model, fmt)
    layers = list(report["layers"])
    first, last = min(layers), max(layers)

    lengths_cache: dict[str, int] = {}

    def lengths(prompts: Sequence[str]) -> list[int]:
        todo = [q for q in dict.fromkeys(prompts) if q not in lengths_cache]
        if todo:
            got = chat_lengths(model, todo, system=None, prompt_format=fmt)
            lengths_cache.update(zip(todo, got, strict=True))
        return [lengths_cache[q] for q in prompts]

    w = Work(model)
    columns = {
        "harmful": sp.harmful_test,
        "jailbreak": rs.jailbreak_test,
        "benign": sp.benign_test,
        "sensitive": rs.sensitive_test,
    }
    fit_sets = [sp.benign_train, sp.harmful_train, rs.fit_benign]
    fit_sets += [rs.fit_malicious] if rs.fit_malicious is not None else []
    fit_len = [n for ps in fit_sets for n in lengths(list(ps))]
    val_h, val_b = lengths(list(sp.harmful_val)), lengths(list(sp.benign_val))
    test_len = [n for ps in columns.values() for n in lengths(list(ps))]
    npca = int(cfg.n_pca_per_column)
    pca_len = [
        n
        for ps in columns.values()
        for n in lengths(list(ps.sample(min(npca, len(ps)), seed=cfg.seed)))
    ]
    n_pca_methods = 3  # ActAdd, AlphaSteer, calibrated AlphaSteer

    # (step, FLOPs as run, FLOPs with a shared prefix, what runs)
    rows: list[tuple[str, float, float, str]] = []
    fit = w.prefill(fit_len, last, unembed=False)
    rows.append(("fit", fit, fit, f"{len(fit_len)} fit prompts cached to layer {last}"))
    cal = w.prefill(lengths(list(rs.calibration)), last, unembed=False)
    cast_val = w.prefill(val_h + val_b, first, unembed=False)
    what = (
        f"{len(rs.calibration)} calibration prompts to layer {last}; "
        f"{len(val_h) + len(val_b)} validation prompts to layer {first} (CAST)"
    )
    rows.append(("gates", cal + cast_val, cal + cast_val, what))

    sweep = report["validation_sweep"]
    steered_runs = [r for r in sweep if r["method"] != "vanilla"]
    full_h = w.prefill(val_h, w.n_layers, unembed=True)
    full_b = w.prefill(val_b, w.n_layers, unembed=True)
    tail_h = w.prefill(val_h, w.n_layers - first, unembed=True)
    tail_b = w.prefill(val_b, w.n_layers - first, unembed=True)
    sweep_f = full_h + full_b
    sweep_s = full_h + full_b
    for r in steered_runs:
        sweep_f += full_h + (full_b if r["benign_score"] is not None else 0)
        sweep_s += tail_h + (tail_b if r["benign_score"] is not None else 0)
    rows.append(("validation_sweep", sweep_f, sweep_s,
                 f"{len(steered_runs) + 1} (method, λ) runs on {len(val_h)} + {len(val_b)} "
                 "validation prompts, every block"))  # fmt: skip

    test = w.prefill(test_len, last, unembed=False)
    rows.append(("test_gates", test, test, f"{len(test_len)} test prompts cached to layer {last}"))
    pca_v = w.prefill(pca_len, last, unembed=False)
    pca_t = w.prefill(pca_len, last - first, unembed=False)
    rows.append(("pca_view", pca_v * (1 + n_pca_methods), pca_t * n_pca_methods,
                 f"{len(pca_len)} prompts × (vanilla + {n_pca_methods} methods) to layer "
                 f"{last}"))  # fmt: skip

    gens = pd.read_csv(run / "generations.csv", keep_default_na=False)
    steps = int(cfg.max_new_tokens) - 1
    eval_f = eval_s = 0.0
    n_gen = 0
    for method, g in gens.groupby("method", sort=False):
        ran = g if (g.steered == "").all() else g[g.steered.astype(str) == "True"]
        lens = lengths(list(ran.prompt))
        n_gen += len(lens)
        dec = w.decode(lens, steps)
        eval_f += w.prefill(lens, w.n_layers, unembed=True) + dec
        if method == "vanilla":
            eval_s += w.prefill(lens, w.n_layers, unembed=True) + dec
        else:
            eval_s += w.prefill(lens, w.n_layers - first, unembed=True) + dec
    rows.append(("evaluate", eval_f, eval_s,
                 f"{n_gen} answers ({gens.method.nunique()} methods), prefill and "
                 f"{steps} one-token steps each, every block"))  # fmt: skip

    rate = gemm_rate(int(model.cfg.d_model), int(model.cfg.d_mlp))
    timings = report["timings"]
    table: list[dict[str, Any]] = []
    for step, f, s, what in rows:
        measured = float(timings.get(step, float("nan")))
        floor = f / rate / 1e9
        table.append({
            "step": step,
            "tflop": round(f / 1e12, 2),
            "floor_s": round(floor, 1),
            "shared_floor_s": round(s / rate / 1e9, 1),
            "measured_s": measured,
            "floor_share_of_measured": round(floor / measured, 2) if measured else None,
            "what": what,
        })  # fmt: skip
    floor_total = sum(r["floor_s"] for r in table)
    shared_total = sum(r["shared_floor_s"] for r in table)
    measured_total = sum(r["measured_s"] for r in table)
    table.append({
        "step": "total (these steps)",
        "tflop": round(sum(f for _, f, _, _ in rows) / 1e12, 2),
        "floor_s": round(floor_total, 1),
        "shared_floor_s": round(shared_total, 1),
        "measured_s": round(measured_total, 1),
        "floor_share_of_measured": round(floor_total / measured_total, 2),
        "what": "",
    })  # fmt: skip
    res = {
        "run": str(run),
        "machine": machine(),
        "threads": args.threads,
        "gemm_gflops": round(rate, 1),
        "aim_s": AIM_S,
        "demo_seconds": report["seconds"],
        "floor_s": round(floor_total, 1),
        "shared_floor_s": round(shared_total, 1),
        "floor_over_aim": round(floor_total / AIM_S, 2),
        "shared_floor_over_aim": round(shared_total / AIM_S, 2),
        "rows": table,
    }
    print(pd.DataFrame(table).to_string(index=False))
    print(f"GEMM {rate:.1f} GFLOP/s; floor {floor_total:.0f} s, shared-prefix floor "
          f"{shared_total:.0f} s, aim {AIM_S:.0f} s")  # fmt: skip
    write_report(res, args.out)


if __name__ == "__main__":
    main()
