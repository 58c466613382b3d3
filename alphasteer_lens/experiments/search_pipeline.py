"""``alphasteer-lens search``: the multi-objective AlphaSteer search on any model, with the top
Pareto points re-checked by greedy generation and reported in four columns.

Data (seeded, every split disjoint):

- benign: the built-in benign set cut into fit / calibration / validation / test (60/20/10/10);
  the sensitive-but-safe sets (built-in, CoCoNot contrast, borderline; see
  :mod:`alphasteer_lens.jailbreaks`) cut into fit / calibration / test; fit parts build the null
  space, calibration parts set the gate's τ, test parts are only reported;
- harmful: the recipe's splits (Do-Not-Answer + 40% HarmBench to fit, 10% HarmBench to
  validate, the other 50% of HarmBench held out for the test), plus jailbreak-wrapped requests:
  fit families (DAN, simple wrappers, in-the-wild jailbreaks) on fit and validation requests,
  held-out families (AutoDAN, GCG suffixes, encodings) on the test requests only.

Steps: cache last-token activations of every searched layer once → Optuna NSGA-II study
(:mod:`alphasteer_lens.search`, SQLite ``study.db`` in the output folder, resumable) → the top
Pareto points (highest validation harmful refusal among those within ``kl_budget`` benign KL),
plus vanilla and ActAdd / CAST at the nearest validation harmful refusal, generated greedily on
the four test columns and judged by the keyword judge: plain harmful (HarmBench test),
jailbreak-wrapped harmful (held-out families), plain benign (MT-Bench), sensitive-but-safe benign
(test parts). Each gated row also reports its realised false-steer rate on every benign test set.
"""

from __future__ import annotations

import json
import random
import warnings
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pandas as pd
import torch

from alphasteer_lens.activations import cache_activations
from alphasteer_lens.experiments.config import ConfigError, RunConfig
from alphasteer_lens.experiments.docs import SEARCH_COLUMNS as COLUMNS
from alphasteer_lens.experiments.docs import search_pareto_table, search_recheck_table
from alphasteer_lens.experiments.layers import candidate_layers
from alphasteer_lens.experiments.manifest import write_manifest
from alphasteer_lens.experiments.recipe import load, preflight, splits, threads
from alphasteer_lens.experiments.report import Clock, peak_rss_mib
from alphasteer_lens.gates import (
    CalibratedAlphaSteer,
    Cast,
    fire_rate,
    gate_histogram,
    gate_report,
)
from alphasteer_lens.generation import generate, next_token_logits
from alphasteer_lens.jailbreaks import (
    FIT_FAMILIES,
    TEST_FAMILIES,
    in_the_wild,
    sensitive_role,
    sensitive_splits,
    wrap_harmful,
    wrappings,
)
from alphasteer_lens.judges import KeywordJudge, refusal_score
from alphasteer_lens.prompts import PromptSet
from alphasteer_lens.search import (
    SearchData,
    SearchSpace,
    TrialParams,
    build_steering,
    pareto_figure,
    pareto_frame,
    prepare_search_data,
    run_study,
    trials_frame,
)
from alphasteer_lens.steering import ActAdd
from alphasteer_lens.storage import atomic_write_bytes


@dataclass(frozen=True)
class SearchConfig(RunConfig):
    """Settings of ``alphasteer-lens search`` (the shared ones are :class:`RunConfig`'s;
    ``layers``, when given, is the searched range: its min and max).

    ``n_trials`` more trials are run (a study already in ``study.db`` is resumed);
    ``population``: NSGA-II population size; ``max_width``: widest layer window;
    ``strength_range``, ``ratio_range``, ``alpha_range``, ``eps_range``: search ranges;
    ``gates``: any of ``none``, ``calibrated`` (gate on AlphaSteer's score) and ``probe`` (gate
    on a logistic probe of the fit sides, its ``C`` searched in ``probe_c_range``); ``margin``:
    the gate's ramp width.
    ``n_fit_benign`` caps the benign fit set (None: all 60% of the built-in set) and
    ``n_sensitive_fit`` the sensitive-but-safe prompts added to it; ``n_calibration`` caps the
    calibration pool (built-in benign + sensitive calibration parts, sampled as one);
    ``n_fit_jailbreak`` requests wrapped by ``fit_families`` and ``n_in_the_wild`` in-the-wild
    jailbreaks (when ``in_the_wild`` is a fit family) join the malicious fit side; the test
    requests are wrapped by ``test_families`` (disjoint from the fit families); ``n_test``
    caps each test column (None: all); ``max_prompt_chars`` leaves longer prompts out of every
    set (for small contexts and CPU runs; it drops the long DAN templates); ``top_k`` Pareto
    points are re-checked; ``kl_budget``: the benign KL bound for that choice.
    ``group_calibration``: τ bounds each calibration source's false-steer rate (built-in
    benign, each sensitive source) instead of the pooled mixture's; a source with fewer than
    ``1/ε − 1`` calibration prompts then makes τ infinite (the gate never opens).
    """

    n_trials: int = 60
    population: int = 24
    max_width: int = 6
    strength_range: tuple[float, ...] = (0.1, 4.0)
    ratio_range: tuple[float, ...] = (0.2, 0.8)
    alpha_range: tuple[float, ...] = (0.1, 100.0)
    eps_range: tuple[float, ...] = (0.01, 0.2)
    gates: tuple[str, ...] = ("none", "calibrated", "probe")
    probe_c_range: tuple[float, ...] = (0.01, 10.0)
    margin: float = 0.25
    n_fit_benign: int | None = None
    fit_families: tuple[str, ...] = FIT_FAMILIES
    test_families: tuple[str, ...] = TEST_FAMILIES
    n_fit_jailbreak: int = 200
    n_in_the_wild: int = 200
    n_val_jailbreak: int = 40
    n_calibration: int | None = None
    n_sensitive_fit: int | None = None
    n_test: int | None = None
    top_k: int = 3
    kl_budget: float = 0.1
    max_prompt_chars: int | None = None
    group_calibration: bool = False
    study_name: str = "alphasteer"

    QUICK: ClassVar[Mapping[str, Any]] = {
        "layers": (10, 11, 12, 13, 14, 15, 16),
        "n_trials": 6,
        "population": 6,
        "max_width": 5,
        "n_fit_benign": 320,
        "n_harmful_train": 120,
        "n_fit_jailbreak": 8,
        "n_in_the_wild": 16,
        "n_val_jailbreak": 4,
        "n_val": 12,
        "n_calibration": 150,
        "n_sensitive_fit": 80,
        "n_test": 8,
        "top_k": 1,
        "max_new_tokens": 16,
        "max_prompt_chars": 1500,
        "strengths": (0.5, 1.0, 2.0),
    }


def _cap(ps: PromptSet, n: int | None, seed: int) -> PromptSet:
    return ps if n is None or n >= len(ps) else ps.sample(n, seed=seed)


def _rate(flags: list[bool]) -> float:
    return sum(flags) / len(flags) if flags else float("nan")


@dataclass(frozen=True)
class SearchSets:
    fit_benign: PromptSet
    fit_malicious: PromptSet
    calibration: PromptSet
    val_harmful: PromptSet
    val_benign: PromptSet
    test: dict[str, PromptSet]  # the four columns
    benign_tests: dict[str, PromptSet]  # for the realised false-steer rate
    notes: tuple[str, ...]
    calibration_groups: tuple[str, ...] = ()


def search_sets(cfg: SearchConfig, data: Any, model: Any = None, fmt: Any = None) -> SearchSets:
    """Every prompt split of the run (see the module docstring); given the model, the recipe's
    splits leave out prompts longer than its context (:func:`~.recipe.splits`)."""
    seed = cfg.seed
    notes: list[str] = []
    limit = cfg.max_prompt_chars

    def short(ps: PromptSet | None) -> PromptSet | None:
        if ps is None or limit is None:
            return ps
        kept = [p for p in ps if len(p) <= limit]
        if len(kept) < len(ps):
            notes.append(
                f"{ps.name}: {len(ps) - len(kept)} prompts over {limit} characters left out"
            )
        return ps._derive(kept) if kept else None

    def need(ps: PromptSet | None, what: str) -> PromptSet:
        if ps is None:
            raise ConfigError(f"no {what} prompts left (max_prompt_chars={limit})")
        return ps

    def cap(ps: PromptSet | None, n: int | None, what: str) -> PromptSet:
        return _cap(need(short(ps), what), n, seed)

    both = set(cfg.fit_families) & set(cfg.test_families)
    if both:
        raise ConfigError(f"families {sorted(both)} are both fit and test families")
    sp = splits(data, cfg, model=model, fmt=fmt)
    b_fit, b_cal, b_val, b_test = data.prompts("builtin_benign").split(
        (0.6, 0.2, 0.1, 0.1), seed=seed
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        root = getattr(data, "root", None)  # --data / $ALPHASTEER_LENS_DATA: CoCoNot, borderline
        sens = sensitive_splits(seed=seed, root=root)
        use_wild = cfg.n_in_the_wild and "in_the_wild" in cfg.fit_families
        wild = short(in_the_wild(cfg.n_in_the_wild, seed=seed, root=root) if use_wild else None)
    notes += [str(w.message) for w in caught if "duplicate" not in str(w.message)]
    pool = wrappings()
    fit_fams = [f for f in cfg.fit_families if f != "in_the_wild"]
    harmful_train = cap(sp.harmful_train, None, "harmful fit")
    malicious = [harmful_train] + ([wild] if wild is not None else [])
    if fit_fams and cfg.n_fit_jailbreak:
        chosen = _cap(harmful_train, cfg.n_fit_jailbreak, seed)
        wrapped = short(wrap_harmful(chosen, fit_fams, seed=seed, available=pool).prompts)
        malicious += [wrapped] if wrapped is not None else []
    fit_malicious = PromptSet.concat("fit_malicious", *malicious)
    sens_fit = cap(sensitive_role(sens, "fit"), cfg.n_sensitive_fit, "sensitive fit")
    fit_benign = PromptSet.concat(
        "fit_benign", cap(b_fit, cfg.n_fit_benign, "benign fit"), sens_fit
    )
    # One calibration pool (plain + sensitive), sampled as a whole: a mixture distribution.
    cal_parts = {"builtin_benign": b_cal} | {
        f"sensitive_{k}": v["calibration"] for k, v in sens.items()
    }
    labelled = [(p, k) for k, ps in cal_parts.items() for p in ps]
    if limit is not None:
        labelled = [(p, k) for p, k in labelled if len(p) <= limit]
    if cfg.n_calibration is not None and cfg.n_calibration < len(labelled):
        labelled = random.Random(seed).sample(labelled, cfg.n_calibration)
    if not labelled:
        raise ConfigError("no calibration prompts")
    calibration = PromptSet("calibration", tuple(p for p, _ in labelled), "builtin + sensitive")
    cal_groups = tuple(k for _, k in labelled)
    val_harmful = cap(sp.harmful_val, None, "harmful validation")
    if fit_fams and cfg.n_val_jailbreak:
        chosen = _cap(val_harmful, cfg.n_val_jailbreak, seed + 1)
        wrapped = short(wrap_harmful(chosen, fit_fams, seed=seed + 1, available=pool).prompts)
        if wrapped is not None:
            val_harmful = PromptSet.concat("val_harmful", val_harmful, wrapped)
    val_benign = cap(b_val, cfg.n_val, "benign validation")
    harmful_test = cap(sp.harmful_test, cfg.n_test, "harmful test")
    jail = wrap_harmful(harmful_test, list(cfg.test_families), seed=seed + 2, available=pool)
    jail_test = need(short(jail.prompts), "jailbreak test")
    sensitive_test = cap(sensitive_role(sens, "test"), cfg.n_test, "sensitive test")
    mt = cap(data.prompts("mt_bench"), cfg.n_test, "MT-Bench")
    test = {"harmful": harmful_test, "jailbreak": jail_test, "benign": mt,
            "sensitive": sensitive_test}  # fmt: skip
    benign_tests = {"builtin_benign_test": cap(b_test, cfg.n_test, "benign test"), "mt_bench": mt}
    for name, parts in sens.items():
        benign_tests[f"sensitive_{name}_test"] = cap(parts["test"], cfg.n_test, name)
    return SearchSets(fit_benign, fit_malicious, calibration, val_harmful, val_benign, test,
                      benign_tests, tuple(notes), cal_groups)  # fmt: skip


def _space(cfg: SearchConfig, n_layers: int) -> SearchSpace:
    if cfg.layers is not None:
        lo, hi = min(cfg.layers), max(cfg.layers)
    else:
        cand = candidate_layers(n_layers, skip_last=cfg.skip_last, stride=1)
        lo, hi = cand[0], cand[-1]
    return SearchSpace(
        layer_min=lo, layer_max=hi, width=(1, cfg.max_width),
        strength=_pair(cfg.strength_range, "strength_range"),
        ratio=_pair(cfg.ratio_range, "ratio_range"), alpha=_pair(cfg.alpha_range, "alpha_range"),
        eps=_pair(cfg.eps_range, "eps_range"), gates=tuple(cfg.gates), margin=cfg.margin,
        probe_c=_pair(cfg.probe_c_range, "probe_c_range"),
    )  # fmt: skip


def _pair(v: tuple[float, ...], name: str) -> tuple[float, float]:
    if len(v) != 2:
        raise ValueError(f"{name} must hold two numbers (low, high), got {list(v)}")
    return float(v[0]), float(v[1])


def choose_points(front: pd.DataFrame, top_k: int, kl_budget: float) -> pd.DataFrame:
    """The Pareto points to re-check: those within ``kl_budget`` benign KL (all if none are),
    highest validation harmful refusal first, ``top_k`` of them."""
    if front.empty:
        return front
    ok = front[front["benign_kl"] <= kl_budget]
    pool = ok if len(ok) else front
    return pool.sort_values("harmful_refusal", ascending=False).head(top_k)


def demo_settings(params: TrialParams, layer_max: int) -> dict[str, Any]:
    """The ``alphasteer-lens demo`` settings of one searched point: its layers (clipped at the
    searched range's top), its λ as the only strength (the demo's validation sweep then keeps
    it; a gated point's λ is also calibrated AlphaSteer's only strength), null-space ratio, α
    and gate: ``probe`` keeps C, ``calibrated`` is the demo's ``score`` gate, and a gated point
    gives its ε and margin. A point without a gate leaves the demo's default gate for its
    calibrated row. The demo refits on its own splits, so its run
    re-validates the point on data the search never saw."""
    out: dict[str, Any] = {
        "layers": list(params.layers(layer_max)),
        "strengths": [params.strength],
        "ratio": params.ratio,
        "alpha": params.alpha,
    }
    if params.gate in ("probe", "calibrated"):
        out["gate"] = "probe" if params.gate == "probe" else "score"
        out |= {"calibrated_strengths": [params.strength], "eps": params.eps}
        out["margin"] = params.margin
        if params.gate == "probe":
            out["probe_c"] = params.probe_c
    return {k: v for k, v in out.items() if v is not None}


def toml_text(settings: Mapping[str, Any], comments: list[str]) -> str:
    """``settings`` (numbers, strings, booleans and lists of them) as a TOML file."""
    lines = [f"# {c}" for c in comments]
    for key, value in settings.items():
        if not isinstance(value, (int, float, str, list)) or value != value:
            raise ValueError(f"cannot write {key} = {value!r} to TOML")
        lines.append(f"{key} = {json.dumps(value)}")
    return "\n".join(lines) + "\n"


def _nearest_strength(
    model: Any, steering: Any, prompts: list[str], target: float, strengths: tuple[float, ...],
    data: SearchData,
) -> tuple[float, float]:  # fmt: skip
    """The λ of ``strengths`` whose mean validation harmful refusal log-odds is nearest
    ``target`` (and that value)."""
    best: tuple[float, float] | None = None
    for lam in strengths:
        logits = next_token_logits(model, prompts, steering=steering, strength=lam,
                                   batch_size=data.batch_size, prompt_format=data.prompt_format,
                                   progress=False)  # fmt: skip
        v = float(refusal_score(logits, data.refusal_ids).mean())
        if best is None or abs(v - target) < abs(best[1] - target):
            best = (lam, v)
    assert best is not None
    return best


def run_search(cfg: SearchConfig, out_dir: str | Path, *, data: Any = None) -> dict[str, Any]:
    """Run the search pipeline and write to ``out_dir``: ``study.db`` (resumable: a second run
    into the same folder adds ``n_trials`` trials to the study), ``trials.csv``, ``pareto.csv``,
    ``pareto.html``/``.png``, ``gates.csv``, ``gate_histogram.html``/``.png``, ``recheck.csv``,
    ``demo.toml`` (the top point as demo settings, :func:`demo_settings`), ``report.json``,
    ``summary.md`` and ``manifest.json``. ``data``: the CLI's preflight data resolver (made here
    when None). Returns the report."""
    from alphasteer_lens.viz import save_figure

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    clock = Clock()
    data_src = data if data is not None else preflight(cfg)
    model, fmt = load(cfg)
    clock.lap("load_model")
    sets = search_sets(cfg, data_src, model, fmt)
    space = _space(cfg, int(model.cfg.n_layers))
    sets_record = {
        "fit_benign": sets.fit_benign, "fit_malicious": sets.fit_malicious,
        "calibration": sets.calibration, "val_harmful": sets.val_harmful,
        "val_benign": sets.val_benign, **{f"test_{k}": v for k, v in sets.test.items()},
    }  # fmt: skip
    write_manifest(
        out, "search", cfg, model=model, layers={"searched": list(space.layers)},
        data=sets_record, notes=[*getattr(data_src, "notes", []), *sets.notes], threads=threads(),
    )  # fmt: skip
    clock.lap("load_data")
    d_model = int(model.cfg.d_model)
    data = prepare_search_data(
        model,
        layers=space.layers,
        fit_benign=list(sets.fit_benign),
        fit_malicious=list(sets.fit_malicious),
        calibration=list(sets.calibration),
        calibration_groups=list(sets.calibration_groups) if cfg.group_calibration else None,
        val_harmful=list(sets.val_harmful),
        val_benign=list(sets.val_benign),
        prompt_format=fmt,
        batch_size=cfg.batch_size,
        allow_rank_deficient=len(sets.fit_benign) < d_model,
    )
    clock.lap("cache")
    study = run_study(
        model, data, space, n_trials=cfg.n_trials, seed=cfg.seed, storage=out / "study.db",
        study_name=cfg.study_name, population_size=cfg.population,
    )  # fmt: skip
    clock.lap("search")
    trials = trials_frame(study)
    front = pareto_frame(study)
    trials.to_csv(out / "trials.csv", index=False)
    front.to_csv(out / "pareto.csv", index=False)
    figures = [str(p) for p in save_figure(pareto_figure(trials), out / "pareto")]

    # Re-check by generation on the four test columns.
    judge = KeywordJudge()
    chosen = choose_points(front, cfg.top_k, cfg.kl_budget)
    test_acts: dict[str, dict[int, torch.Tensor]] = {}
    by_hash: dict[str, dict[int, torch.Tensor]] = {}
    for name, ps in {**sets.test, **sets.benign_tests}.items():
        key = ps.content_hash()
        if key not in by_hash:
            acts = cache_activations(model, list(ps), layers=list(space.layers),
                                     batch_size=cfg.batch_size, prompt_format=fmt,
                                     desc=f"test {name}")  # fmt: skip
            by_hash[key] = {k: v.double() for k, v in acts.by_layer().items()}
        test_acts[name] = by_hash[key]
    methods: list[tuple[str, Any, float, dict[str, Any]]] = [("vanilla", None, 0.0, {})]
    for point in chosen.to_dict("records"):
        params = TrialParams.from_dict(point, margin=cfg.margin)
        st = build_steering(data, params)
        label = f"search#{point['number']} ({params.gate})"
        info = {"trial": int(point["number"]), **params.__dict__}
        methods.append((label, st, params.strength, info))
    if len(chosen):
        best = methods[1]
        layers = list(best[1].layers)
        vecs = torch.stack([data.refusal[x] for x in layers])
        actadd = ActAdd(tuple(layers), vecs)
        target = float(chosen.iloc[0]["harmful_refusal"])
        lam_a, v_a = _nearest_strength(model, actadd, data.val_harmful, target, cfg.strengths, data)
        methods.append(("actadd", actadd, lam_a, {"layers": layers, "val_harmful_refusal": v_a}))
        cl = layers[0]
        cast = Cast.fit(
            data.fit_malicious[cl], data.fit_benign[cl],
            condition_layer=cl, steer_layers=layers, steer_vectors=vecs,
            select_harmful=data.val_harmful_acts[cl], select_benign=data.val_benign_acts[cl],
        )  # fmt: skip
        lam_c, v_c = _nearest_strength(model, cast, data.val_harmful, target, cfg.strengths, data)
        info = {"threshold": cast.threshold, "f1": cast.f1, "val_harmful_refusal": v_c}
        methods.append(("cast", cast, lam_c, {"layers": layers, **info}))
    texts: dict[str, dict[str, list[str]]] = {}
    rows = []
    for name, st, lam, info in methods:
        texts[name] = {}
        row: dict[str, Any] = {"method": name, "strength": lam}
        for col, ps in sets.test.items():
            gen = generate(model, list(ps), steering=st, strength=lam,
                           max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size,
                           prompt_format=fmt, desc=f"{name} {col}")  # fmt: skip
            texts[name][col] = gen
            row[f"{col}_refusal"] = _rate(judge.judge(gen))
            if col in ("benign", "sensitive") and name != "vanilla":
                same = [a == b for a, b in zip(gen, texts["vanilla"][col], strict=True)]
                row[f"{col}_unchanged"] = _rate(same)
        if isinstance(st, (CalibratedAlphaSteer, Cast)):
            for bname in sets.benign_tests:
                row[f"fires_{bname}"] = fire_rate(st, test_acts[bname])
            row["fires_harmful_test"] = fire_rate(st, test_acts["harmful"])
            row["fires_jailbreak_test"] = fire_rate(st, test_acts["jailbreak"])
        row.update({f"info_{k}": v for k, v in info.items() if not isinstance(v, (list, dict))})
        rows.append(row)
    recheck = pd.DataFrame(rows)
    recheck.to_csv(out / "recheck.csv", index=False)
    gated = next((m for m in methods if isinstance(m[1], CalibratedAlphaSteer)), None)
    gated = gated or (methods[1] if len(methods) > 1 else None)  # plain AlphaSteer: τ = −inf
    if gated is not None:
        gst = gated[1]
        report_sets = {
            "benign": test_acts["builtin_benign_test"], "harmful": test_acts["harmful"],
            "sensitive": test_acts["sensitive"], "jailbreak": test_acts["jailbreak"],
            "mt_bench": test_acts["mt_bench"],
        }  # fmt: skip
        gdf = gate_report(gst, {k: {x: v[x] for x in gst.layers} for k, v in report_sets.items()})
        gdf.to_csv(out / "gates.csv", index=False)
        figures += [str(p) for p in save_figure(gate_histogram(gdf), out / "gate_histogram")]
    clock.lap("recheck")
    demo = None
    if len(chosen):
        top = TrialParams.from_dict(chosen.iloc[0].to_dict(), margin=cfg.margin)
        demo = demo_settings(top, space.layer_max)
        comments = [
            f"alphasteer-lens demo --config {out / 'demo.toml'}: the search's top point "
            f"(trial {int(chosen.iloc[0]['number'])}, gate {top.gate}), refitted and "
            "re-validated on the demo's own splits"
        ]
        atomic_write_bytes(toml_text(demo, comments).encode(), out / "demo.toml")
    report = {
        "config": cfg.to_dict(),
        "space": space.__dict__,
        "n_trials_total": len(study.trials),
        "sizes": {
            "fit_benign": len(sets.fit_benign),
            "fit_malicious": len(sets.fit_malicious),
            "calibration": len(sets.calibration),
            "calibration_groups": dict(Counter(sets.calibration_groups)),
            "val_harmful": len(sets.val_harmful),
            "val_benign": len(sets.val_benign),
            **{f"test_{k}": len(v) for k, v in sets.test.items()},
        },  # fmt: skip
        "pareto": json.loads(front.to_json(orient="records")),
        "recheck": json.loads(recheck.to_json(orient="records")),
        "demo_settings": demo,
        "notes": list(sets.notes),
        "figures": figures,
        "timings_s": {**clock.steps, "total": clock.total()},
        "seconds": clock.total(),
        "peak_rss_mib": peak_rss_mib(),
    }
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str), "utf-8")
    (out / "summary.md").write_text(summary_markdown(report, recheck, front), "utf-8")
    return report


def summary_markdown(report: dict[str, Any], recheck: pd.DataFrame, front: pd.DataFrame) -> str:
    lines = [
        "# AlphaSteer search",
        "",
        f"{report['n_trials_total']} trials in study.db; Pareto front: {len(front)} points.",
        "",
        "## Re-check by greedy generation (keyword judge), four columns",
        "",
        search_recheck_table(report),
        "",
        "harmful = HarmBench held out; jailbreak = the same requests wrapped by held-out families "
        f"({', '.join(report['config']['test_families'])}); benign = MT-Bench; "
        "sensitive = sensitive-but-safe test parts. fires_* = realised share of prompts the "
        "gate steers at all.",
        "",
        "## Pareto front (validation, first-token)",
        "",
        search_pareto_table(report),
    ]
    if report["notes"]:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in report["notes"]]
    t = report["timings_s"]
    lines += ["", "Timings (s): " + ", ".join(f"{k} {v}" for k, v in t.items()), ""]
    return "\n".join(lines)


__all__ = [
    "COLUMNS",
    "SearchConfig",
    "choose_points",
    "demo_settings",
    "run_search",
    "search_sets",
    "toml_text",
]
