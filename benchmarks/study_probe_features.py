"""What should the calibrated gate's probe read? A study on the demo's own splits (seed 0).

The demo's gate (``CalibratedAlphaSteer`` with a ``GateProbe``) reads one logistic probe per
steered layer on the **last prompt token** and takes the maximum over layers 14–18. This script
asks whether another reading separates harm from benign prompts better, with every choice judged
on data that is *not* a test column:

- ``val_harmful``: share of the 80 plain harmful validation prompts the gate opens for;
- ``lofo_jailbreak``: leave-one-family-out on the jailbreak-wrapped *fit* prompts (dan, simple,
  in-the-wild): the probe is fitted without one family and τ calibrated again; the share of that
  family's prompts it opens for (the mean over the three);
- ``cv_false_steer_plain`` / ``_sensitive``: the 5-fold held-out false-steer rate of τ on the
  calibration prompts, split by their plain-benign and sensitive-but-safe parts.

The ``test_*`` columns (held-out HarmBench, held-out jailbreak families, MT-Bench, sensitive
test prompts) are reported, never used to choose. Variants: single layers 6–22 on the last token
and on the mean over prompt tokens (C = 0.1), and the demo's window 14–18 on the last token, the
mean and both concatenated, C chosen by cross-validation on the fit sides as the demo does.

    python benchmarks/study_probe_features.py --data ../shared/data --out results/probe_features

One forward pass per prompt to layer 23 (4,266 prompts, ≈ 11 min on two cores) keeps the
last-token and mean activations of every layer in an activation file (``--acts``, default in the
cache directory; reused when present, checked by its content hash), then ≈ 5 min of probe fits.
Writes ``report.json`` and ``report.csv`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from _common import setup
from tqdm import tqdm

from alphasteer_lens.chat import encode_chat, length_batches
from alphasteer_lens.experiments import recipe as R
from alphasteer_lens.experiments.demo import DemoConfig, demo_sets
from alphasteer_lens.gates import GateProbe, conformal_threshold
from alphasteer_lens.jailbreaks import wrap_harmful, wrappings
from alphasteer_lens.sources import cache_dir
from alphasteer_lens.storage import (
    atomic_save_safetensors,
    atomic_write_json,
    load_safetensors_checked,
)

LAYERS = list(range(24))  # resid_pre 0..23: the last ~20% of SmolLM2's 30 layers are skipped
EPS, FOLDS, SEED = 0.02, 5, 0
FIT_MAL, FIT_BEN = ("harmful_train", "fit_jailbreak"), ("benign_train", "fit_sensitive")
TESTS = ("harmful_test", "jailbreak_test", "mt_bench", "sensitive_test")


def _grab(
    act: torch.Tensor, hook: Any, *, j: int, rows: list[int], mask: torch.Tensor,
    last: torch.Tensor, mean: torch.Tensor,
) -> None:  # fmt: skip
    a = act.detach().float()
    last[rows, j] = a[:, -1]  # left padding: the last column is the last prompt token
    mean[rows, j] = (a * mask).sum(1) / mask.sum(1)


def cache(data_dir: str, path: Path) -> None:
    """Every demo set's last-token and prompt-mean ``resid_pre`` at ``LAYERS``, one pass each."""
    cfg = DemoConfig(layers=(14, 15, 16, 17, 18), data_dir=data_dir)
    data = R.preflight(cfg)
    model, fmt = R.load(cfg)
    sp, rs = demo_sets(data, cfg, model, fmt)
    n_fit = min(cfg.n_fit_jailbreak, len(sp.harmful_train))
    wrapped = wrap_harmful(
        sp.harmful_train.sample(n_fit, seed=cfg.seed), [f for f in cfg.fit_families
        if f != "in_the_wild"], seed=cfg.seed, available=wrappings(),
    )  # fmt: skip
    family = dict(zip(wrapped.prompts, wrapped.families, strict=True))
    family |= {p: w.split("/")[0] for p, w in rs.wrapping.items()}
    builtin = set(data.prompts("builtin_benign"))
    sets = {
        "harmful_train": sp.harmful_train, "fit_jailbreak": rs.fit_malicious,
        "benign_train": sp.benign_train, "fit_sensitive": rs.fit_benign,
        "calibration": rs.calibration, "harmful_val": sp.harmful_val,
        "benign_val": sp.benign_val, "harmful_test": sp.harmful_test,
        "jailbreak_test": rs.jailbreak_test, "mt_bench": sp.benign_test,
        "sensitive_test": rs.sensitive_test,
    }  # fmt: skip
    names = [f"blocks.{x}.hook_resid_pre" for x in LAYERS]
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {"kind": "probe_features_acts", "layers": LAYERS, "sets": {}}
    for key, ps in sets.items():
        assert ps is not None, key
        prompts = list(ps)
        n, d = len(prompts), int(model.cfg.d_model)
        last, mean = torch.empty(n, len(LAYERS), d), torch.empty(n, len(LAYERS), d)
        tokens = [len(model.tokenizer(p)["input_ids"]) + 40 for p in prompts]  # + template
        for idx in tqdm(length_batches(tokens, 32, 4096), desc=key):
            batch = encode_chat(model, [prompts[i] for i in idx], prompt_format=fmt)
            m = batch.attention_mask.float().unsqueeze(-1)
            hook = partial(_grab, rows=idx, mask=m, last=last, mean=mean)
            model.run_with_hooks(
                batch.tokens, attention_mask=batch.attention_mask, return_type=None,
                fwd_hooks=[(nm, partial(hook, j=j)) for j, nm in enumerate(names)],
                stop_at_layer=LAYERS[-1] + 1,
            )  # fmt: skip
        tensors[f"{key}/last"], tensors[f"{key}/mean"] = last, mean
        meta["sets"][key] = {
            "hash": ps.content_hash(),
            "family": [family.get(p, "in_the_wild" if key == "fit_jailbreak" else "") for p in ps],
            "builtin": [p in builtin for p in prompts],
        }
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(tensors, path, {"study": meta})


class Study:
    """Probe variants on the cached activations; every number from fit/validation data except
    the ``test_*`` columns."""

    def __init__(self, path: Path) -> None:
        tensors, meta = load_safetensors_checked(path)
        info = json.loads(meta["study"])
        if info.get("kind") != "probe_features_acts" or info.get("layers") != LAYERS:
            raise SystemExit(f"{path}: not this study's activation file; delete it to recache")
        self.t, self.sets = tensors, info["sets"]

    def x(self, key: str, layer: int, reads: str) -> np.ndarray:
        j = LAYERS.index(layer)
        parts = [self.t[f"{key}/{r}"][:, j].double() for r in reads.split("+")]
        return torch.cat(parts, -1).numpy()

    def probe(self, layers: list[int], reads: str, c: float, drop: str = "") -> GateProbe:
        def side(keys: tuple[str, ...]) -> dict[int, torch.Tensor]:
            out = {}
            for x in layers:
                rows = []
                for k in keys:
                    a = self.x(k, x, reads)
                    if drop and k == "fit_jailbreak":
                        a = a[np.array(self.sets[k]["family"]) != drop]
                    rows.append(a)
                out[x] = torch.from_numpy(np.concatenate(rows))
            return out

        return GateProbe.fit(side(FIT_MAL), side(FIT_BEN), layers, C=c, seed=SEED)

    def score(self, probe: GateProbe, key: str, reads: str) -> np.ndarray:
        """The gate score of every prompt of ``key``: the maximum of the layers' logits."""
        cols = [
            probe.scores(i, torch.from_numpy(self.x(key, x, reads))).numpy()
            for i, x in enumerate(probe.layers)
        ]
        return np.max(cols, 0)

    def row(self, name: str, layers: list[int], reads: str, c: float | str) -> dict[str, Any]:
        t0 = time.time()
        if c == "cv":
            mal = {x: torch.from_numpy(np.concatenate([self.x(k, x, reads) for k in FIT_MAL]))
                   for x in layers}  # fmt: skip
            ben = {x: torch.from_numpy(np.concatenate([self.x(k, x, reads) for k in FIT_BEN]))
                   for x in layers}  # fmt: skip
            c, _ = GateProbe.select_c(mal, ben, layers, seed=SEED)
        probe = self.probe(layers, reads, float(c))
        cal = self.score(probe, "calibration", reads)
        tau = conformal_threshold(cal, EPS, too_few="ignore")
        plain = np.array(self.sets["calibration"]["builtin"])
        perm = torch.randperm(len(cal), generator=torch.Generator().manual_seed(SEED)).numpy()
        fired = np.zeros(len(cal), dtype=bool)
        for hold in np.array_split(perm, FOLDS):
            t = conformal_threshold(np.delete(cal, hold), EPS, too_few="ignore")
            fired[hold] = cal[hold] > t
        fam = np.array(self.sets["fit_jailbreak"]["family"])
        lofo = {}
        for f in sorted(set(fam)):
            p2 = self.probe(layers, reads, float(c), drop=f)
            t2 = conformal_threshold(self.score(p2, "calibration", reads), EPS, too_few="ignore")
            lofo[f] = float(np.mean(self.score(p2, "fit_jailbreak", reads)[fam == f] > t2))
        r: dict[str, Any] = {
            "variant": name, "layers": f"{layers[0]}-{layers[-1]}", "reads": reads,
            "C": float(c), "tau": tau,
            "val_harmful": float(np.mean(self.score(probe, "harmful_val", reads) > tau)),
            "lofo_jailbreak": float(np.mean(list(lofo.values()))),
            **{f"lofo_{f}": v for f, v in lofo.items()},
            "cv_false_steer_plain": float(fired[plain].mean()),
            "cv_false_steer_sensitive": float(fired[~plain].mean()),
        }  # fmt: skip
        for key in TESTS:
            r[f"test_{key}"] = float(np.mean(self.score(probe, key, reads) > tau))
        jt = self.score(probe, "jailbreak_test", reads) > tau
        tf = np.array(self.sets["jailbreak_test"]["family"])
        r |= {f"test_jailbreak_{f}": float(jt[tf == f].mean()) for f in sorted(set(tf))}
        r["seconds"] = round(time.time() - t0, 1)
        return r


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="the data directory (../shared/data)")
    p.add_argument("--out", default="results/probe_features")
    p.add_argument("--acts", default=None, help="activation file (default: in the cache dir)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    setup(args.threads)
    acts = Path(args.acts or cache_dir() / "studies" / "probe_features_acts.safetensors")
    t0 = time.time()
    if not acts.exists():
        cache(args.data, acts)
    t_cache = time.time() - t0
    study = Study(acts)
    rows = []
    variants = [(f"layer {x}, {r}", [x], r, 0.1) for r in ("last", "mean") for x in range(6, 23, 2)]
    variants += [("demo window, " + r, list(range(14, 19)), r, "cv")
                 for r in ("last", "mean", "last+mean")]  # fmt: skip
    for name, layers, reads, c in tqdm(variants, desc="probe variants"):
        rows.append(study.row(name, layers, reads, c))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = pd.DataFrame(rows)
    table.to_csv(out / "report.csv", index=False)
    report = {
        "eps": EPS, "folds": FOLDS, "seed": SEED, "layers_cached": LAYERS,
        "data_hashes": {k: v["hash"] for k, v in study.sets.items()},
        "n": {k: len(v["builtin"]) for k, v in study.sets.items()},
        "cache_seconds": round(t_cache, 1), "seconds": round(time.time() - t0, 1),
        "rows": rows,
    }  # fmt: skip
    atomic_write_json(report, out / "report.json")
    print(table.drop(columns=["seconds"]).to_string(index=False))


if __name__ == "__main__":
    main()
