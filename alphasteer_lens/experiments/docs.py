"""Result tables in the README and docs, generated from committed report files.

A table is written between two markers naming its kind and its report (a path relative to the
Markdown file's repository root)::

    <!-- generated: demo results/demo/report.json -->
    | ... |
    <!-- end generated -->

``python -m alphasteer_lens.experiments.docs --write README.md docs/*.md`` rewrites every block
from its report; without ``--write`` it lists stale blocks and exits 1 (the test suite runs the
check). Kinds: ``demo`` (methods table), ``demo_families`` (its jailbreak column per held-out
wrapping family), ``compare`` (trade-off table), ``scans`` (refusal rate
per condition and prompt set), ``scans_classifier`` (the transition classifier on each test),
``scans_anchoring`` (the vocabulary-projection segments), ``audit`` (refusal and margin per
vector and condition), ``search_recheck`` (the search's re-checked points in four columns) and
``search_pareto`` (its Pareto front), ``probe_features`` (the gate-probe study,
``benchmarks/study_probe_features.py``), ``alphasteer_coefficient`` (AlphaSteer's coefficient
per test column, ``benchmarks/study_alphasteer_coefficient.py``) and ``demo_floor`` (the demo's
compute floor per step against its measured time, ``benchmarks/demo_floor.py``).
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from alphasteer_lens.experiments.report import markdown_table

BLOCK = re.compile(
    r"(<!-- generated: (?P<kind>\w+) (?P<report>\S+) -->\n)(?P<body>.*?)(<!-- end generated -->)",
    re.S,
)
DEMO_METHODS = (
    "vanilla",
    "actadd",
    "cast",
    "actadd_calibrated",
    "alphasteer",
    "alphasteer_calibrated",
)
DEMO_COLUMNS = (
    "strength",
    "harmful_refusal_rate",
    "jailbreak_refusal_rate",
    "benign_refusal_rate",
    "sensitive_refusal_rate",
    "benign_unchanged_fraction",
    "sensitive_unchanged_fraction",
    "benign_steered_fraction",
    "sensitive_steered_fraction",
)


def demo_table(report: dict[str, Any]) -> str:
    """The demo's methods table (also in its ``summary.md``)."""
    df = pd.DataFrame(report["methods"]).T
    order = _demo_order(df.index)
    return markdown_table(df.loc[order, [c for c in DEMO_COLUMNS if c in df.columns]])


def _demo_order(methods: Any) -> list[str]:
    """The demo's methods in table order: the known ones first, any others after."""
    names = [str(m) for m in methods]
    return [m for m in DEMO_METHODS if m in names] + [m for m in names if m not in DEMO_METHODS]


def demo_families_table(report: dict[str, Any]) -> str:
    """The demo's jailbreak column per held-out wrapping family: refusal rate, and the share a
    gate steers at all (gated methods), one row per method."""
    fams = report.get("jailbreak_by_family") or {}
    rows = {}
    for method in _demo_order(fams):
        row: dict[str, float] = {}
        for family, cell in fams[method].items():
            row[f"{family} (n={cell['n']:.0f}) refused"] = cell["refusal_rate"]
            if "steered_fraction" in cell:
                row[f"{family} steered"] = cell["steered_fraction"]
        rows[method] = row
    return markdown_table(pd.DataFrame(rows).T) if rows else "(no jailbreak column)"


def compare_table(report: dict[str, Any]) -> str:
    """The comparison's trade-off table, one row per (method, λ)."""
    df = pd.DataFrame(report["table"]).set_index(["method", "strength"])
    return markdown_table(df)


def scans_table(report: dict[str, Any]) -> str:
    """SCANS' refusal rate per condition (rows) and prompt set (columns)."""
    df = pd.DataFrame(report["refusal"])
    rates = df.pivot(index="condition", columns="prompt_set", values="refusal_rate")
    order = list(dict.fromkeys(df.condition))
    sets = list(dict.fromkeys(df.prompt_set))
    return markdown_table(rates.loc[order, sets].reset_index(), index=False)


def scans_classifier_table(report: dict[str, Any]) -> str:
    """SCANS' transition classifier at its τ: validation and each held-out test."""
    clf = report["classifier"]
    tests = [k for k in ("validation", "harmful_vs_sensitive", "harmful_vs_benign") if k in clf]
    cols = ["n_harmful", "n_benign", "precision", "recall", "f1", "auroc", "fpr"]
    df = pd.DataFrame({k: clf[k] for k in tests}).T[cols]
    df[["n_harmful", "n_benign"]] = df[["n_harmful", "n_benign"]].astype(int)
    return markdown_table(df)


def scans_anchoring_table(report: dict[str, Any]) -> str:
    """SCANS' layer segments: refusal-token hit rate, z-score and the top projected tokens."""
    rows = [
        {
            "segment": s["segment"],
            "layers": f"{s['layers'][0]}–{s['layers'][-1]}",
            "hit_rate": s["hit_rate"],
            "z": s["z"],
            "top_tokens": " ".join(f"`{t}`".replace("|", "\\|") for t in s["top_tokens"][:8]),
        }
        for s in report["anchoring"]["segments"]
    ]
    return markdown_table(pd.DataFrame(rows), index=False)


AUDIT_COLUMNS = (
    "refusal_harmbench",
    "refusal_donotanswer",
    "refusal_harmful",
    "refusal_jailbreak",
    "harmful_kl",
    "shift",
    "margin_fraction",
    "above_boundary",
    "compliance_rate",
    "json_opening",
)


def audit_table(report: dict[str, Any]) -> str:
    """The audit's rows, one per (vector, condition), in the columns every vector has."""
    frames = [
        pd.DataFrame(res["table"]).assign(vector=res["name"]).set_index(["vector", "condition"])
        for res in report["results"]
    ]
    df = pd.concat(frames)
    return markdown_table(df[[c for c in AUDIT_COLUMNS if c in df.columns]])


SEARCH_COLUMNS = ("harmful", "jailbreak", "benign", "sensitive")
PARETO_COLUMNS = (
    "number", "start", "width", "strength", "ratio", "alpha", "gate", "eps", "probe_c",
    "harmful_refusal", "benign_kl", "benign_refusal", "benign_steered_frac",
)  # fmt: skip


def search_recheck_table(report: dict[str, Any]) -> str:
    """The search's re-check by greedy generation: the four columns, the share of benign
    answers unchanged and the realised gate rates (``fires_*``), one row per method."""
    df = pd.DataFrame(report["recheck"])
    cols = ["method", "strength"] + [f"{c}_refusal" for c in SEARCH_COLUMNS]
    cols += ["benign_unchanged", "sensitive_unchanged"]
    cols += [c for c in df.columns if c.startswith("fires_")]
    return markdown_table(df[[c for c in cols if c in df.columns]], index=False)


def search_pareto_table(report: dict[str, Any]) -> str:
    """The search's Pareto front (validation objectives), highest harmful refusal first."""
    df = pd.DataFrame(report["pareto"])
    if df.empty:
        return "(empty Pareto front)"
    return markdown_table(df[[c for c in PARETO_COLUMNS if c in df.columns]], index=False)


PROBE_COLUMNS = (
    "variant", "C", "tau", "val_harmful", "lofo_jailbreak", "cv_false_steer_plain",
    "cv_false_steer_sensitive", "test_harmful_test", "test_jailbreak_test", "test_mt_bench",
    "test_sensitive_test",
)  # fmt: skip


def probe_features_table(report: dict[str, Any]) -> str:
    """The gate-probe study: what each probe variant's gate opens for, on validation data
    (``val_*``, ``lofo_*``, ``cv_*``) and, reported only, on the test columns (``test_*``)."""
    df = pd.DataFrame(report["rows"])
    return markdown_table(df[[c for c in PROBE_COLUMNS if c in df.columns]], index=False)


def alphasteer_coefficient_table(report: dict[str, Any]) -> str:
    """AlphaSteer's steering coefficient ``s_l = h·w_l`` per test column and jailbreak family
    (``benchmarks/study_alphasteer_coefficient.py``)."""
    df = pd.DataFrame(report["rows"])
    layers = [f"s_L{x}" for x in report["layers"]]
    return markdown_table(df[["set", "n", *layers, "s_mean", "negative_share"]], index=False)


def demo_floor_table(report: dict[str, Any]) -> str:
    """The demo's forward-pass arithmetic per step, its floor at the measured matrix-product
    rate, and the step's measured time (``benchmarks/demo_floor.py``)."""
    df = pd.DataFrame(report["rows"])
    cols = ["step", "tflop", "floor_s", "shared_floor_s", "measured_s", "floor_share_of_measured"]
    return markdown_table(df[[*cols, "what"]], index=False)


RENDERERS: dict[str, Callable[[dict[str, Any]], str]] = {
    "alphasteer_coefficient": alphasteer_coefficient_table,
    "audit": audit_table,
    "demo": demo_table,
    "demo_families": demo_families_table,
    "demo_floor": demo_floor_table,
    "compare": compare_table,
    "scans": scans_table,
    "scans_classifier": scans_classifier_table,
    "scans_anchoring": scans_anchoring_table,
    "search_recheck": search_recheck_table,
    "search_pareto": search_pareto_table,
    "probe_features": probe_features_table,
}


def _root(doc: Path) -> Path:
    """The repository root above ``doc`` (the folder holding pyproject.toml), else its folder."""
    for parent in doc.resolve().parents:
        if (parent / "pyproject.toml").exists():
            return parent
    return doc.resolve().parent


def render(text: str, root: Path) -> str:
    """``text`` with every generated block rewritten from its report."""

    def block(m: re.Match[str]) -> str:
        kind, report = m["kind"], root / m["report"]
        if kind not in RENDERERS:
            raise ValueError(f"unknown generated table kind {kind!r}; known: {sorted(RENDERERS)}")
        body = RENDERERS[kind](json.loads(report.read_text("utf-8")))
        return f"{m.group(1)}{body}\n{m.group(5)}"

    return BLOCK.sub(block, text)


def stale_blocks(doc: Path) -> list[str]:
    """``kind report`` of every block in ``doc`` that differs from what its report gives."""
    text = doc.read_text("utf-8")
    fresh = render(text, _root(doc))
    old = {m.start(): m for m in BLOCK.finditer(text)}
    new = list(BLOCK.finditer(fresh))
    return [
        f"{doc}: {m['kind']} {m['report']}"
        for m, n in zip(old.values(), new, strict=True)
        if m["body"] != n["body"]
    ]


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    write = "--write" in args
    docs = [Path(a) for a in args if a != "--write"]
    stale = [s for d in docs for s in stale_blocks(d)]
    if write:
        for d in docs:
            d.write_text(render(d.read_text("utf-8"), _root(d)), "utf-8")
        return 0
    for s in stale:
        print(f"stale: {s}")
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
