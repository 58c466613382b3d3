"""The demo: AlphaSteer vs calibrated AlphaSteer vs ActAdd vs CAST vs calibrated ActAdd vs
vanilla on any model, measured end to end in four columns.

Steps (:mod:`~alphasteer_lens.experiments.recipe`): seeded splits; last-token ``resid_pre``
activations; the refusal direction; the steered layers (given, or chosen on validation data);
AlphaSteer, its malicious side widened by jailbreak-wrapped requests (fit families only) and its
benign side by sensitive-but-safe prompts (their fit parts); ActAdd of the same directions; the
artifact is saved right away. Calibrated AlphaSteer gates AlphaSteer on a probe's logit
(``gate="probe"``, default: a per-layer logistic regression of AlphaSteer's two fit sides, wrapped
harm and sensitive-but-safe prompts included) or on AlphaSteer's own score ``h·w``
(``gate="score"``), with τ set by split conformal on held-out benign prompts (built-in benign
validation prompts that did not choose λ, and the sensitive calibration parts) for a false-steer
rate ε; CAST gates ActAdd at its λ on the cosine with a condition direction, threshold by F1 on
validation data; calibrated ActAdd puts ActAdd at its λ behind calibrated AlphaSteer's gate (same
probe, same τ: what the gate alone does with a steering that does not weaken on wrapped prompts).
Then λ is chosen on the validation sets with the first-token refusal score
(AlphaSteer, and calibrated AlphaSteer on its own grid: most harmful refusal with a bounded
benign rise; ActAdd, and CAST with it: matching AlphaSteer's harmful refusal). Every method
generates greedily on the four held-out test columns, judged by the keyword judge: ``harmful``
(HarmBench), ``jailbreak`` (the same held-out requests wrapped by families never used in the
fit), ``benign`` (MT-Bench) and ``sensitive`` (the sensitive-but-safe test parts); gated rows
also report the share of each column they steer at all, and generate only the prompts their
gate opens for (the others get exactly vanilla's answer: the hooks add 0.0).

Outputs: ``alphasteer.safetensors`` (as soon as the fit finishes; λ added once chosen),
``gate_probe.safetensors`` (the calibrated gate's probe, which ``resume`` reuses),
``report.json``, ``summary.md``, ``generations.csv`` (one row per method, set and prompt),
``gates.csv`` and ``gate_histogram`` (the calibrated gate per test prompt and layer), the PCA view
``pca_gated`` (ActAdd, AlphaSteer and calibrated AlphaSteer) with ``pca_points.csv`` and
``pca_shifts.csv``, and ``manifest.json``. ``resume=True`` reuses a saved artifact (and λ, if
chosen) instead of refitting.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar, Literal

import pandas as pd
import torch
from torch import Tensor

from alphasteer_lens.activations import cache_activations
from alphasteer_lens.alphasteer import AlphaSteer
from alphasteer_lens.artifacts import load_steering_with_meta, save_steering
from alphasteer_lens.experiments import recipe as R
from alphasteer_lens.experiments.config import ConfigError, RunConfig
from alphasteer_lens.experiments.data import Data
from alphasteer_lens.experiments.docs import demo_families_table, demo_table
from alphasteer_lens.experiments.manifest import write_manifest
from alphasteer_lens.experiments.report import Clock, peak_rss_mib
from alphasteer_lens.gates import (
    CalibratedAlphaSteer,
    Cast,
    GateProbe,
    ProbeReads,
    fired,
    gate_histogram,
    gate_report,
    held_out_false_steer,
)
from alphasteer_lens.generation import generate_with_logits
from alphasteer_lens.jailbreaks import (
    FIT_FAMILIES,
    TEST_FAMILIES,
    in_the_wild,
    sensitive_role,
    sensitive_splits,
    split_wrappings,
    wrap_harmful,
    wrappings,
)
from alphasteer_lens.judges import KeywordJudge, RefusalTokens, refusal_score
from alphasteer_lens.models import model_name
from alphasteer_lens.pca import centroid_shifts, pca_points
from alphasteer_lens.prompts import PromptSet
from alphasteer_lens.steering import ActAdd
from alphasteer_lens.storage import atomic_write_bytes, atomic_write_json
from alphasteer_lens.viz import pca_figure, save_figure

ARTIFACT = "alphasteer.safetensors"
PROBE = "gate_probe.safetensors"
CV_FOLDS = 5  # folds of the held-out false-steer check on the calibration prompts
# What the saved λ sweep depends on beyond the fit: a resume with any of them changed sweeps again.
SWEEP_SETTINGS = (
    "strengths", "calibrated_strengths", "max_benign_rise", "gate", "probe_reads", "probe_c",
    "eps", "margin",
)  # fmt: skip


COLUMNS = ("harmful", "jailbreak", "benign", "sensitive")


@dataclass(frozen=True)
class DemoConfig(RunConfig):
    """The demo's own settings: how many held-out prompts to generate for (None: all).

    ``fit_families``: jailbreak families that wrap ``n_fit_jailbreak`` training requests on the
    malicious fit side (``in_the_wild`` adds as many in-the-wild jailbreaks from the data
    directory, when it has them); ``test_families`` (disjoint) wrap the held-out requests of the
    ``jailbreak`` column, at most ``n_jailbreak_test`` of them. ``jailbreak_split``: ``"family"``
    holds the test families out whole; ``"wrapping"`` splits each test family's wrappings in two
    (:func:`~alphasteer_lens.jailbreaks.split_wrappings`), fits on one half as well and tests on
    the other, so the column holds only wrappings never fitted. The ``sensitive`` column samples
    at most ``n_sensitive_test`` of the sensitive test parts.

    ``eps``: calibrated AlphaSteer's benign false-steer rate; ``margin``: its ramp width above τ
    (in gate-score units); ``gate``: what the gate reads, ``"probe"`` (a logistic probe of the
    fit sides, inverse regularisation ``probe_c``: a number, or ``"cv"`` to choose it by
    cross-validated log-loss on the fit sides alone, :meth:`GateProbe.select_c`) or ``"score"``
    (AlphaSteer's ``h·w``); ``probe_reads``: what the probe reads at each steered layer, the
    last prompt token, or ``"last+mean"`` (default: and the mean over the prompt's tokens, read
    in the same passes; ``benchmarks/study_probe_features.py`` chose it on validation data).
    ``calibrated_strengths``: calibrated AlphaSteer's own λ grid, chosen on validation data by
    AlphaSteer's rule (its gate keeps most benign prompts unsteered, so it may afford a larger
    λ). ``n_pca_per_column``: prompts of each test column in the PCA view ``pca_gated`` (0: no
    view).
    """

    n_harmful_test: int | None = None
    n_benign_test: int | None = None
    fit_families: tuple[str, ...] = FIT_FAMILIES
    test_families: tuple[str, ...] = TEST_FAMILIES
    n_fit_jailbreak: int = 120
    n_jailbreak_test: int | None = 60
    n_sensitive_test: int | None = 80
    eps: float = 0.02
    margin: float = 0.25
    gate: Literal["probe", "score"] = "probe"
    probe_c: float | Literal["cv"] = "cv"
    probe_reads: ProbeReads = "last+mean"
    calibrated_strengths: tuple[float, ...] = (0.5, 1.0, 1.5, 2.0)
    n_pca_per_column: int = 40
    jailbreak_split: Literal["family", "wrapping"] = "family"

    QUICK: ClassVar[dict[str, Any]] = {
        "strengths": (0.5, 1.0),
        "calibrated_strengths": (1.0, 2.0),
        "max_new_tokens": 12,
        "n_harmful_test": 24,
        "n_benign_test": 24,
        "n_harmful_train": 200,
        "n_fit_jailbreak": 24,
        "n_jailbreak_test": 12,
        "n_sensitive_test": 16,
    }

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.probe_c != "cv" and not 0 < float(self.probe_c) < float("inf"):
            raise ConfigError(f"probe_c must be 'cv' or a finite number > 0, got {self.probe_c!r}")
        if not self.calibrated_strengths or min(self.calibrated_strengths) < 0:
            raise ConfigError(
                f"calibrated_strengths must be non-empty and >= 0, got {self.calibrated_strengths}"
            )
        if self.n_pca_per_column < 0:
            raise ConfigError(f"n_pca_per_column must be ≥ 0, got {self.n_pca_per_column}")

    @classmethod
    def quick_config(cls, seed: int = 0) -> DemoConfig:
        """A few-minute smoke run: fewer prompts, fewer tokens, a shorter λ grid."""
        return cls(seed=seed, quick=True, **cls.QUICK)


def _rate(flags: list[bool]) -> float:
    return float(sum(flags)) / max(len(flags), 1)


@dataclass(frozen=True)
class RobustSets:
    """The sets beyond the plain splits: fit additions, calibration, the two extra columns."""

    fit_malicious: PromptSet | None  # jailbreak-wrapped training requests (fit families)
    fit_benign: PromptSet  # sensitive-but-safe fit parts
    calibration: PromptSet  # unused built-in benign validation + sensitive calibration parts
    jailbreak_test: PromptSet  # held-out requests, held-out families
    sensitive_test: PromptSet  # sensitive-but-safe test parts
    notes: tuple[str, ...]
    wrapping: dict[str, str] = field(default_factory=dict)  # jailbreak prompt -> "family/name"


def _sample(ps: PromptSet, n: int | None, seed: int) -> PromptSet:
    return ps if n is None or n >= len(ps) else ps.sample(n, seed=seed)


def robust_sets(data: Data, sp: R.Splits, cfg: DemoConfig) -> RobustSets:
    """The seeded fit, calibration and test sets of the jailbreak and sensitive columns."""
    import warnings

    both = set(cfg.fit_families) & set(cfg.test_families)
    if both:
        raise ValueError(f"families {sorted(both)} are both fit and test families")
    seed, root = cfg.seed, data.root
    fit_pool = test_pool = wrappings()
    if cfg.jailbreak_split == "wrapping":
        fit_pool, test_pool = split_wrappings(fit_pool, cfg.test_families, seed=seed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sens = sensitive_splits(seed=seed, root=root)
        wild = None
        if "in_the_wild" in cfg.fit_families and cfg.n_fit_jailbreak:
            wild = in_the_wild(cfg.n_fit_jailbreak, seed=seed, root=root)
    notes = tuple(str(w.message) for w in caught if "duplicate" not in str(w.message))
    families = [f for f in cfg.fit_families if f != "in_the_wild"]
    if cfg.jailbreak_split == "wrapping":
        families += list(cfg.test_families)  # their fit halves
    n_fit = min(cfg.n_fit_jailbreak, len(sp.harmful_train))
    parts = []
    if families and n_fit:
        chosen = sp.harmful_train.sample(n_fit, seed=seed)
        parts.append(wrap_harmful(chosen, families, seed=seed, available=fit_pool).prompts)
    if wild is not None:
        parts.append(wild)
    fit_malicious = PromptSet.concat("fit_jailbreak", *parts) if parts else None
    wrapped = wrap_harmful(
        sp.harmful_test, list(cfg.test_families), seed=seed + 2, available=test_pool
    )
    jail = wrapped.prompts
    wrapping = {
        p: f"{f}/{n}" for p, f, n in zip(jail, wrapped.families, wrapped.names, strict=True)
    }
    n_jail = cfg.n_jailbreak_test
    jailbreak_test = (
        jail if n_jail is None or n_jail >= len(jail) else jail.sample(n_jail, seed=seed)
    )
    # Calibration: the built-in validation prompts that did not choose λ, and the sensitive
    # calibration parts; none of them fitted w or chose λ (the conformal bound needs that).
    parts_val = (1 - cfg.val_fraction, cfg.val_fraction)
    full_val = data.prompts("builtin_benign").split(parts_val, seed=seed)[1]
    used = set(sp.benign_val)
    plain = [p for p in full_val if p not in used]
    cal_parts = [full_val._derive(plain)] if plain else []
    calibration = PromptSet.concat("calibration", *cal_parts, sensitive_role(sens, "calibration"))
    sensitive_test = _sample(sensitive_role(sens, "test"), cfg.n_sensitive_test, seed)
    return RobustSets(
        fit_malicious=fit_malicious,
        fit_benign=sensitive_role(sens, "fit"),
        calibration=calibration,
        jailbreak_test=jailbreak_test._derive(jailbreak_test.prompts, "jailbreak_test"),
        sensitive_test=sensitive_test._derive(sensitive_test.prompts, "sensitive_test"),
        notes=notes,
        wrapping=wrapping,
    )


def fit_context(rs: RobustSets, model: Any, fmt: Any, room: int) -> RobustSets:
    """:func:`within_context` applied to every robust set; an emptied test column is an error."""
    notes = list(rs.notes)
    out: dict[str, PromptSet | None] = {}
    for name in ("fit_malicious", "fit_benign", "calibration", "jailbreak_test", "sensitive_test"):
        out[name], note = R.within_context(model, getattr(rs, name), fmt, room)
        notes += [note] if note else []
        if out[name] is None and name != "fit_malicious":
            raise ConfigError(f"no {name} prompt fits the model's context")
    return replace(rs, notes=tuple(notes), **out)  # type: ignore[arg-type]


def demo_sets(data: Data, cfg: DemoConfig, model: Any, fmt: Any) -> tuple[R.Splits, RobustSets]:
    """The demo's prompt sets for ``model``: the standard splits and the robust sets (wrapped
    harm, sensitive-but-safe prompts, calibration), each left with room for the answer."""
    sp = R.splits(
        data, cfg, n_harmful_test=cfg.n_harmful_test, n_benign_test=cfg.n_benign_test,
        model=model, fmt=fmt,
    )  # fmt: skip
    return sp, fit_context(robust_sets(data, sp, cfg), model, fmt, cfg.max_new_tokens)


def _fit_sides(
    model: Any, sp: R.Splits, rs: RobustSets, layers: list[int], kw: dict[str, Any]
) -> tuple[dict[int, Any], dict[int, Any]]:
    """AlphaSteer's two fit sides ``{layer: [n, d]}`` again (a resumed run did not keep them;
    ``kw["positions"]`` may ask for more than the fit's last token)."""
    sides = []
    for parts in ((sp.harmful_train, rs.fit_malicious), (sp.benign_train, rs.fit_benign)):
        acts = [
            cache_activations(model, list(ps), layers=layers, desc=f"gate probe {ps.name}", **kw)
            for ps in parts
            if ps is not None and len(ps)
        ]
        sides.append({x: torch.cat([a[x].double() for a in acts]) for x in layers})
    return sides[0], sides[1]


def run_demo(
    out: str | Path | None = None,
    cfg: DemoConfig | None = None,
    *,
    data: Data | None = None,
    resume: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the demo and write its files to ``out`` (default ``cfg.out``, else ``runs/demo``)."""
    cfg = cfg or DemoConfig()
    out = Path(out or cfg.out or "runs/demo")
    out.mkdir(parents=True, exist_ok=True)
    data = data if data is not None else R.preflight(cfg)
    torch.manual_seed(cfg.seed)
    clock = Clock()
    model, fmt = R.load(cfg)
    judge = KeywordJudge()
    refusal_ids = RefusalTokens.from_tokenizer(model.tokenizer).ids
    clock.lap("load_model")

    sp, rs = demo_sets(data, cfg, model, fmt)
    sets = sp.sets() | {
        "fit_sensitive": rs.fit_benign,
        "calibration": rs.calibration,
        "jailbreak_test": rs.jailbreak_test,
        "sensitive_test": rs.sensitive_test,
    }
    if rs.fit_malicious is not None:
        sets["fit_jailbreak"] = rs.fit_malicious
    hashes = {ps.name: ps.content_hash() for ps in sets.values()}
    notes = [*data.notes, *rs.notes]
    clock.lap("load_data")

    def manifest(layers: dict[str, Any] | None) -> None:
        write_manifest(
            out, "demo", cfg, model=model, layers=layers, data=sets, notes=notes,
            threads=R.threads(),
        )  # fmt: skip

    manifest(None)
    artifact = out / ARTIFACT
    reads = cfg.probe_reads if cfg.gate == "probe" else "last"  # what the gate's probe reads
    saved: dict[str, Any] = {}
    fit_acts: dict[str, Any] = {}
    fit_sides: tuple[dict[int, Any], dict[int, Any]] | None = None
    if resume and artifact.exists():
        steering, meta = load_steering_with_meta(artifact, model=model)
        assert isinstance(steering, AlphaSteer)
        steer_a, saved = steering, dict(meta["extra"])
        layers, choice = list(steer_a.layers), saved["layer_choice"]
        refusal = {x: steer_a.r[i] for i, x in enumerate(layers)}
        refused_fraction = saved.get("harmful_train_refused_fraction")
        clock.lap("fit (resumed)")
    else:
        fitted = R.fit(
            model, sp, cfg, fmt, extra_benign=rs.fit_benign, extra_malicious=rs.fit_malicious,
            positions=reads, progress=progress,
        )  # fmt: skip
        steer_a, layers = fitted.alphasteer, fitted.layers
        fit_acts = {"harmful": fitted.harmful, "benign": fitted.benign}
        fit_sides = (fitted.fit_malicious, fitted.fit_benign)
        refusal = {x: fitted.refusal[x] for x in layers}
        choice, refused_fraction = fitted.choice.to_dict(), fitted.refused_fraction
        saved = {
            "direction": cfg.direction,
            "layer_choice": choice,
            "prompt_format": fmt.to_json(),
            "harmful_train_refused_fraction": refused_fraction,
        }
        save_steering(steer_a, artifact, model=model, data_hashes=hashes, extra=saved)
        clock.lap("fit")
    actadd = ActAdd(tuple(layers), torch.stack([refusal[x] for x in layers]))
    manifest(choice)

    # The gates: τ from held-out benign calibration prompts; CAST's threshold by F1 on validation.
    kw: dict[str, Any] = {"batch_size": cfg.batch_size, "prompt_format": fmt, "progress": progress}
    kw_gate = kw | {"positions": reads}  # what the gate reads: the last token, and the mean
    cal = cache_activations(
        model, list(rs.calibration), layers=layers, desc="calibration", **kw_gate
    )
    probe: GateProbe | None = None
    probe_cv: dict[str, float] | None = None
    probe_file = out / PROBE
    if cfg.gate == "probe" and resume and probe_file.exists():  # reused bit for bit
        probe, cv = GateProbe.load(probe_file, layers=layers, d_model=model.cfg.d_model)
        probe_cv = cv or None
        if (cfg.probe_c != "cv" and float(cfg.probe_c) != probe.C) or probe.reads != reads:
            probe = None  # the config now asks for another C or reading: fit again
    if cfg.gate == "probe" and probe is None:
        sides_fit = fit_sides or _fit_sides(model, sp, rs, layers, kw_gate)
        probe_c, probe_cv = cfg.probe_c, None
        if probe_c == "cv":
            probe_c, table = GateProbe.select_c(*sides_fit, layers, seed=cfg.seed, reads=reads)
            probe_cv = table.groupby("C").log_loss.mean().rename(str).to_dict()
        probe = GateProbe.fit(*sides_fit, layers, C=float(probe_c), seed=cfg.seed, reads=reads)
        probe.save(probe_file, cv_log_loss=probe_cv)
    cal_acts = {x: t.double() for x, t in cal.by_layer().items()}
    gated = CalibratedAlphaSteer(steer_a, margin=cfg.margin, probe=probe).calibrate_activations(
        cal_acts, cfg.eps
    )
    # The realised false-steer rate on in-distribution benign prompts τ never saw (k-fold).
    folds = min(CV_FOLDS, len(rs.calibration))
    cv = held_out_false_steer(gated, cal_acts, cfg.eps, folds=folds, seed=cfg.seed)
    cl = layers[0]
    sides = {"harmful": sp.harmful_train, "benign": sp.benign_train}
    cast_fit = {k: fit_acts[k][cl] for k in sides} if fit_acts else {}  # reuse the fit's cache
    for name, ps in {**sides, "harmful_val": sp.harmful_val, "benign_val": sp.benign_val}.items():
        if name not in cast_fit:
            acts = cache_activations(model, list(ps), layers=[cl], desc=f"CAST {name}", **kw)
            cast_fit[name] = acts[cl]
    cast = Cast.fit(
        cast_fit["harmful"], cast_fit["benign"], condition_layer=cl, steer_layers=layers,
        steer_vectors=actadd.vectors, select_harmful=cast_fit["harmful_val"],
        select_benign=cast_fit["benign_val"],
    )  # fmt: skip
    clock.lap("gates")

    # λ on validation data: AlphaSteer's and calibrated AlphaSteer's (each the most harmful
    # refusal with a bounded benign rise), ActAdd's matching AlphaSteer's harmful refusal.
    sweep_settings = {k: cfg.to_dict()[k] for k in SWEEP_SETTINGS}
    if "calibrated_strength" in saved and saved.get("sweep_settings") == sweep_settings:
        lam_a, lam_act = float(saved["strength"]), float(saved["actadd_strength"])
        lam_g = float(saved["calibrated_strength"])
        sweep = pd.DataFrame(saved["validation_sweep"])
        clock.lap("validation_sweep (resumed)")
    else:
        sweep = R.validation_sweep(
            model, list(sp.harmful_val), list(sp.benign_val),
            {"alphasteer": steer_a, "actadd": actadd, "alphasteer_calibrated": gated},
            {"alphasteer": cfg.strengths, "actadd": cfg.strengths,
             "alphasteer_calibrated": cfg.calibrated_strengths},
            fmt=fmt, batch_size=cfg.batch_size, harmful_only=("actadd",), progress=progress,
        )  # fmt: skip
        lam_a, lam_act = R.choose_strengths(sweep, cfg.max_benign_rise)
        lam_g = R.choose_strength(sweep, cfg.max_benign_rise, "alphasteer_calibrated")
        saved |= {
            "strength": lam_a,
            "actadd_strength": lam_act,
            "calibrated_strength": lam_g,
            "validation_sweep": sweep.to_dict(orient="records"),
            "sweep_settings": sweep_settings,
        }
        save_steering(steer_a, artifact, model=model, data_hashes=hashes, extra=saved)
        clock.lap("validation_sweep")

    columns = {
        "harmful": sp.harmful_test,
        "jailbreak": rs.jailbreak_test,
        "benign": sp.benign_test,
        "sensitive": rs.sensitive_test,
    }
    test_acts = {
        col: {x: t.double() for x, t in cache_activations(
            model, list(ps), layers=layers, desc=f"test {col}", **kw_gate).by_layer().items()}
        for col, ps in columns.items()
    }  # fmt: skip
    # Which test prompts the calibrated gate opens for, per layer, and the score histograms.
    gates_df = gate_report(gated, test_acts, {col: list(ps) for col, ps in columns.items()})
    atomic_write_bytes(gates_df.to_csv(index=False).encode(), out / "gates.csv")
    histogram = gate_histogram(
        gates_df, column="gate_score", title=f"Calibrated AlphaSteer: gate scores ({cfg.gate})"
    )
    figures = [str(p) for p in save_figure(histogram, out / "gate_histogram")]
    clock.lap("test_gates")
    methods: dict[str, tuple[Any, float]] = {
        "vanilla": (None, 0.0),
        "actadd": (actadd, lam_act),
        "cast": (cast, lam_act),
        "actadd_calibrated": (replace(gated, steer="actadd"), lam_act),
        "alphasteer": (steer_a, lam_a),
        "alphasteer_calibrated": (gated, lam_g),
    }
    if cfg.n_pca_per_column:
        pca_methods = {m: methods[m] for m in ("actadd", "alphasteer", "alphasteer_calibrated")}
        figures += _pca_view(model, columns, pca_methods, layers[-1], cfg, fmt, out)
        clock.lap("pca_view")
    results: dict[str, dict[str, float]] = {}
    rows: list[dict[str, Any]] = []
    vanilla: dict[str, tuple[list[str], Tensor]] = {}
    for name, (st, lam) in methods.items():
        res: dict[str, float] = {"strength": lam}
        for col, ps in columns.items():
            steered: list[bool | None] = [None] * len(ps)
            run = list(range(len(ps)))
            if isinstance(st, (CalibratedAlphaSteer, Cast)):
                steered = fired(st, test_acts[col]).tolist()
                res[f"{col}_steered_fraction"] = _rate([bool(x) for x in steered])
                run = [i for i, f in enumerate(steered) if f]
            # A prompt the gate stays shut for gets exactly zero at every hook, so its answer and
            # first-token scores are vanilla's (tests/test_gates.py checks bit-identity): only
            # the prompts it opens for are generated again.
            base = vanilla.get(col) if len(run) < len(ps) else None  # some prompts skipped
            gen, score = (list(base[0]), base[1].clone()) if base else ([], None)
            if run:
                got, first = generate_with_logits(
                    model, [ps[i] for i in run], steering=st, strength=lam,
                    max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size,
                    prompt_format=fmt, progress=progress, desc=f"{name} {col}",
                )  # fmt: skip
                assert first is not None
                got_score = refusal_score(first, refusal_ids)
                if score is None:
                    gen, score = got, got_score
                else:
                    for j, i in enumerate(run):
                        gen[i], score[i] = got[j], got_score[j]
            assert score is not None
            refused = judge.judge(gen)
            res[f"{col}_refusal_rate"] = _rate(refused)
            res[f"{col}_refusal_score"] = score.mean().item()
            if name == "vanilla":
                vanilla[col] = (gen, score)
            if col in ("benign", "sensitive"):
                same = [a == b for a, b in zip(gen, vanilla[col][0], strict=True)]
                res[f"{col}_unchanged_fraction"] = _rate(same)
            rows += [
                {"method": name, "strength": lam, "set": col, "prompt": p, "completion": c,
                 "refused": r, "steered": f, "wrapping": rs.wrapping.get(p, "")}
                for p, c, r, f in zip(ps, gen, refused, steered, strict=True)
            ]  # fmt: skip
        results[name] = res
    clock.lap("evaluate")

    report: dict[str, Any] = {
        "model": model_name(model),
        "layers": layers,
        "layer_choice": choice,
        "prompt_format": fmt.to_json(),
        "strength": lam_a,
        "actadd_strength": lam_act,
        "calibrated_strength": lam_g,
        "columns": list(COLUMNS),
        "methods": results,
        "gate": {
            "eps": cfg.eps,
            "margin": cfg.margin,
            "tau": list(gated.tau or ()),
            "n_calibration": gated.n_calibration,
            "held_out_false_steer": float(cv.false_steer_rate.mean()),
            "held_out_false_steer_folds": cv.false_steer_rate.tolist(),
            "cast_layer": cl,
            "cast_threshold": cast.threshold,
            "cast_f1": cast.f1,
            "kind": cfg.gate,
            "probe_c": probe.C if probe is not None else None,
            "probe_reads": probe.reads if probe is not None else None,
            "probe_c_how": (
                None if probe is None else "given" if probe_cv is None else "cv on the fit sides"
            ),
            "probe_cv_log_loss": probe_cv,
        },  # fmt: skip
        "figures": figures,
        "benign_leakage": {str(k): v for k, v in zip(layers, steer_a.leakage, strict=True)},
        "direction": cfg.direction,
        "harmful_train_refused_fraction": refused_fraction,
        "data": {ps.name: len(ps) for ps in sets.values()},
        "data_hashes": hashes,
        "notes": notes,
        "config": cfg.to_dict(),
        "validation_sweep": sweep.to_dict(orient="records"),
        "jailbreak_by_family": by_family(pd.DataFrame(rows)),
        "timings": clock.steps,
    }
    report["seconds"] = clock.total()
    report["peak_rss_mib"] = peak_rss_mib()
    atomic_write_json(report, out / "report.json")
    atomic_write_bytes(pd.DataFrame(rows).to_csv(index=False).encode(), out / "generations.csv")
    atomic_write_bytes(summary_markdown(report).encode(), out / "summary.md")
    return report


def by_family(rows: pd.DataFrame) -> dict[str, dict[str, dict[str, float]]]:
    """The jailbreak column per wrapping family (held out from the fit): ``{method: {family:
    {"n", "refusal_rate", "steered_fraction"}}}``, the steered share for gated methods only."""
    jail = rows[rows.set == "jailbreak"].assign(family=lambda d: d.wrapping.str.split("/").str[0])
    out: dict[str, dict[str, dict[str, float]]] = {}
    for (method, family), g in jail.groupby(["method", "family"], sort=False):
        cell = {"n": float(len(g)), "refusal_rate": float(g.refused.mean())}
        if g.steered.notna().all():
            cell["steered_fraction"] = float(g.steered.astype(bool).mean())
        out.setdefault(str(method), {})[str(family)] = cell
    return out


def _pca_view(
    model: Any,
    columns: dict[str, PromptSet],
    steered: dict[str, tuple[Any, float]],
    layer: int,
    cfg: DemoConfig,
    fmt: Any,
    out: Path,
) -> list[str]:
    """AlphaSteer's PCA figure with the calibrated gate beside it: held-out benign (MT-Bench and
    sensitive-but-safe) vs harmful (plain and jailbreak-wrapped) last-token activations at
    ``layer``, vanilla vs steered, each method at its own λ. Writes ``pca_points.csv``,
    ``pca_shifts.csv`` (centroid shifts) and ``pca_gated.html``/``.png``; returns the figures."""

    def pick(*names: str) -> list[str]:
        n = cfg.n_pca_per_column
        return [p for c in names for p in columns[c].sample(min(n, len(columns[c])), seed=cfg.seed)]

    basis, points = pca_points(
        model, pick("benign", "sensitive"), pick("harmful", "jailbreak"),
        {m: st for m, (st, _) in steered.items()}, {m: lam for m, (_, lam) in steered.items()},
        layer=layer, batch_size=cfg.batch_size, prompt_format=fmt,
    )  # fmt: skip
    for name, df in (("pca_points", points), ("pca_shifts", centroid_shifts(points))):
        atomic_write_bytes(
            df.to_csv(index=False, float_format="%.6g").encode(), out / f"{name}.csv"
        )
    fig = pca_figure(
        points, basis=basis, methods=list(steered),
        title=f"Held-out prompts at {basis.hook}: benign = MT-Bench + sensitive-but-safe, "
        "malicious = HarmBench plain + jailbreak-wrapped",
    )  # fmt: skip
    return [str(p) for p in save_figure(fig, out / "pca_gated")]


_GATE_WORDS = {"probe": "a logistic probe's logit", "score": "AlphaSteer's score h·w"}


def summary_markdown(report: dict[str, Any]) -> str:
    """A short human-readable summary of a demo report."""
    leak = ", ".join(f"L{k}: {v:.3f}" for k, v in report["benign_leakage"].items())
    choice = report.get("layer_choice") or {}
    return "\n".join(
        [
            f"# alphasteer_lens demo: {report['model']}",
            "",
            f"Steered layers {report['layers']} (`resid_pre`, prompt positions; "
            f"{choice.get('how', 'given')}); "
            f"AlphaSteer λ = {report['strength']}, ActAdd λ = {report['actadd_strength']} "
            "(chosen on validation data); calibrated AlphaSteer: gate on "
            f"{_GATE_WORDS.get(report['gate'].get('kind', 'score'), '?')}, ε = "
            f"{report['gate']['eps']}, τ = {report['gate']['tau'][0]:.3f} from "
            f"{report['gate']['n_calibration']} held-out benign prompts"
            + (
                f" (realised false-steer rate on calibration prompts held out of τ, "
                f"{len(report['gate']['held_out_false_steer_folds'])}-fold: "
                f"{report['gate']['held_out_false_steer']:.1%})"
                if "held_out_false_steer" in report["gate"]
                else ""
            )
            + f"; CAST at layer {report['gate']['cast_layer']}, threshold "
            f"{report['gate']['cast_threshold']}"
            + (
                "; calibrated ActAdd: ActAdd at its λ behind calibrated AlphaSteer's gate and τ."
                if "actadd_calibrated" in report["methods"]
                else "."
            ),
            "Data (name: prompts): "
            + ", ".join(f"{k}: {v}" for k, v in report["data"].items())
            + ".",
            *[f"Note: {n}" for n in report.get("notes", [])],
            "Columns: harmful = HarmBench held out; jailbreak = the same requests wrapped by "
            "families held out from the fit; benign = MT-Bench; sensitive = sensitive-but-safe "
            "prompts held out from fit and calibration. Refusal = keyword judge on greedy "
            "answers; steered = share of prompts a gate steers at all.",
            "",
            demo_table(report),
            "",
            "The jailbreak column per wrapping family (held out from the fit):",
            "",
            demo_families_table(report),
            "",
            f"Benign leakage ‖Hb P‖/‖Hb‖: {leak}.",
            f"Total time: {report['seconds']:.0f} s; peak memory {report.get('peak_rss_mib')} MiB.",
            "",
        ]
    )
