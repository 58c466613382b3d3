"""The audit pipeline on the embedded SmolLM2 (``alphasteer-lens audit``): prompt sets from the
pinned wheels and the package, the built-in compliance and JSON vectors (or a user's vector), one
:class:`~alphasteer_lens.audit.Auditor`, and a report with figures."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from alphasteer_lens.audit import Auditor, AuditSets
from alphasteer_lens.steering import ActAdd
from alphasteer_lens.storage import atomic_write_bytes, atomic_write_json


@dataclass(frozen=True)
class AuditConfig:
    """Settings of :func:`run_audit`. Layers are the demo's AlphaSteer layers, so the
    ``+alphasteer`` mitigation is the configuration reported there."""

    seed: int = 0
    layers: tuple[int, ...] = (14, 15, 16, 17, 18)
    compliance_strength: float = 0.1
    json_strength: float = 1.0
    n_build: int = 128
    n_eval: int = 32
    n_json: int = 16
    n_fit_harmful: int = 256
    n_fit_harmless: int = 640
    max_new_tokens: int = 24
    json_tokens: int = 64
    batch_size: int = 16
    reference: bool = True

    @classmethod
    def quick(cls, seed: int = 0) -> AuditConfig:
        """A smoke run of about a minute: few prompts, short answers, no AlphaSteer-only row."""
        return cls(
            seed=seed, n_build=8, n_eval=4, n_json=3, n_fit_harmful=48, n_fit_harmless=64,
            max_new_tokens=8, json_tokens=16, reference=False,
        )  # fmt: skip


def default_sets(cfg: AuditConfig) -> tuple[AuditSets, list[str], list[str]]:
    """Audit sets from the pinned wheels, the package and (if found) ``shared/data``: harmful =
    held-out HarmBench and Do-Not-Answer (which this model refuses more often); jailbreak = the
    held-out HarmBench prompts in the four simple templates; compliance = borderline-but-benign
    requests (``alphasteer/borderline_val``) or held-out benign instructions; JSON = held-out
    benign instructions + " Answer in JSON format.". Returns the sets, the prompts the vectors are
    built from (disjoint from all of them) and notes."""
    from alphasteer_lens import prompts as P
    from alphasteer_lens.benign_vectors import JSON_SUFFIX

    n, seed, notes = cfg.n_eval, cfg.seed, []
    benign = P.benign_instructions().deduplicated()
    benign = benign.sample(cfg.n_build + cfg.n_json + cfg.n_fit_harmless + n, seed=seed)
    cut = np.cumsum([cfg.n_build, cfg.n_json, cfg.n_fit_harmless])
    build, json_set, fit_harmless, held = np.split(np.array(benign.prompts, dtype=object), cut)
    dna = P.do_not_answer().deduplicated().sample(cfg.n_fit_harmful // 2 + n, seed=seed)
    hb_fit, hb_test = P.harmbench().split((0.5, 0.5), seed=seed)
    n_hb = cfg.n_fit_harmful // 2
    hb_eval = hb_test.sample(min(n, len(hb_test)), seed=seed)
    names = [k for k in P.jailbreak_templates() if k.startswith("simple/")]
    templates = P.jailbreak_templates()
    jail = [
        templates[names[i % len(names)]].replace(P.PROMPT_SLOT, p) for i, p in enumerate(hb_eval)
    ]
    try:
        compliance = list(P.shared_data("alphasteer/borderline_val").sample(n, seed=seed))
    except FileNotFoundError as err:
        compliance = list(held)
        notes.append(f"shared/data not found ({err}): compliance measured on benign instructions")
    sets = AuditSets(
        harmful={"harmbench": list(hb_eval), "donotanswer": list(dna.prompts[:n])},
        jailbreak=jail,
        fit_harmful=[*dna.prompts[n:], *hb_fit.sample(min(n_hb, len(hb_fit)), seed=seed)],
        fit_harmless=list(fit_harmless),
        compliance=compliance,
        json=[p + JSON_SUFFIX for p in json_set],
    )
    return sets, list(build), notes


def run_audit(
    out: str | Path,
    *,
    vector_path: str | Path | None = None,
    quick: bool = False,
    config: AuditConfig | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Audit on the embedded SmolLM2: the built-in compliance and JSON vectors, or the vector in
    ``vector_path`` (safetensors or GGUF). Writes ``report.json``, ``summary.md`` and one figure
    per vector (``audit_{name}.html``, and ``.png`` when a browser is installed)."""
    from alphasteer_lens.audit_report import summary_markdown  # noqa: I001
    from alphasteer_lens.benign_vectors import compliance_vector, json_vector, load_vector
    from alphasteer_lens.models import load_model, model_name
    from alphasteer_lens.viz import save_figure

    cfg = config or (AuditConfig.quick() if quick else AuditConfig())
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    model = load_model()
    sets, build, notes = default_sets(cfg)
    kw: dict[str, Any] = {"batch_size": cfg.batch_size, "progress": progress}
    jobs: list[tuple[str, ActAdd, float, tuple[str, ...]]]
    if vector_path is not None:
        vector = load_vector(vector_path, model=model)
        jobs = [(Path(vector_path).stem, vector, 1.0, ("compliance", "json"))]
    else:
        jobs = [
            ("compliance", compliance_vector(model, build, cfg.layers, **kw),
             cfg.compliance_strength, ("compliance",)),
            ("json", json_vector(model, build, cfg.layers, **kw), cfg.json_strength, ("json",)),
        ]  # fmt: skip
    auditor = Auditor.create(
        model, sets, max_new_tokens=cfg.max_new_tokens, json_tokens=cfg.json_tokens,
        batch_size=cfg.batch_size, cache=not quick, progress=progress,
    )  # fmt: skip
    results, figures = [], {}
    for name, vector, lam, gains in jobs:
        res = auditor.audit(vector, lam, name=name, gains=gains, reference=cfg.reference)
        results.append(res.to_dict())
        figures[name] = [str(p) for p in save_figure(res.figure, out / f"audit_{name}")]
    notes = [
        f"Model {model_name(model)}; keyword judge on greedy answers ({cfg.max_new_tokens} new "
        f"tokens, {cfg.json_tokens} for JSON); AlphaSteer ratio {auditor.ratio}, α "
        f"{auditor.alpha}, λ {auditor.alphasteer_strength}; prompts per harmful set {cfg.n_eval}.",
        *notes,
    ]
    report: dict[str, Any] = {
        "model": model_name(model),
        "config": asdict(cfg),
        "data": {"build": len(build), "fit_harmful": len(sets.fit_harmful),
                 "fit_harmless": len(sets.fit_harmless), "jailbreak": len(sets.jailbreak),
                 "compliance": len(sets.compliance), "json": len(sets.json),
                 **{k: len(v) for k, v in sets.harmful.items()}},
        "results": results,
        "figures": figures,
        "notes": notes,
        "seconds": round(time.perf_counter() - start, 1),
    }  # fmt: skip
    atomic_write_json(report, out / "report.json")
    atomic_write_bytes(summary_markdown(results, notes).encode(), out / "summary.md")
    return report
