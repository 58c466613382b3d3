"""The notebooks: stored without outputs, and run top to bottom (01-03 on the embedded SmolLM2,
04 on tiny random GPT-2 and Qwen2 models built offline)."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def test_notebooks_exist() -> None:
    assert [p.name for p in NOTEBOOKS] == [
        "01_quickstart.ipynb",
        "02_pca_figures.ipynb",
        "03_layer_sweep.ipynb",
        "04_any_model.ipynb",
    ]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_outputs_are_stripped(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{path.name}: a code cell has outputs"
            assert cell.execution_count is None, f"{path.name}: a code cell has a count"


# A last cell appended before running: prints what each notebook computed as one JSON line, so
# the test checks concrete content, not just that a cell produced some output.
PROBES = {
    "01_quickstart": """import json
print(json.dumps({
    "n_benign": len(benign), "d_model": int(model.cfg.d_model), "leakage": list(steering.leakage),
    "scores": rows, "answers": {str(k): v for k, v in answers.items()},
}))""",
    "02_pca_figures": """import json
shifts = centroid_shifts(points)
print(json.dumps({"shifts": shifts.to_dict(orient="records"), "rows": len(points)}))""",
    "03_layer_sweep": """import json
print(json.dumps({
    "layers": [int(x) for x in logit.layer], "auroc": [float(x) for x in logit.auroc],
    "generation_layers": [int(x) for x in generation.layer],
}))""",
    "04_any_model": """import json
print(json.dumps({
    "classes": [type(m).__name__ for m in (base, chat)],
    "formats": [default_format(m.tokenizer).kind for m in (base, chat)],
    "k": [ns[l].k for l in LAYERS], "leakage": [float(ns[l].leakage) for l in LAYERS],
    "reloaded": list(reloaded.layers),
    "shifts": centroid_shifts(points_c).to_dict(orient="records"),
}))""",
}


def _check_quickstart(facts: dict) -> None:
    assert facts["n_benign"] >= facts["d_model"] == 576  # full-rank Gram matrix: no shortcut
    assert len(facts["leakage"]) == 5
    assert all(0.0 < x < 0.5 for x in facts["leakage"]), facts["leakage"]  # measured, not 0 / 1
    score = {(r["strength"], r["set"]): r["refusal log-odds"] for r in facts["scores"]}
    assert score[(0.5, "malicious")] > score[(0.0, "malicious")]  # steering adds refusal ...
    rise_m = score[(0.5, "malicious")] - score[(0.0, "malicious")]
    rise_b = score[(0.5, "benign")] - score[(0.0, "benign")]
    assert rise_m > rise_b  # ... to malicious prompts more than to benign ones
    for answers in facts["answers"].values():
        assert len(answers) == 2 and all(isinstance(a, str) and a.strip() for a in answers)


def _check_pca(facts: dict) -> None:
    shift = {(r["method"], r["label"]): r["shift"] for r in facts["shifts"] if r["strength"] == 0.5}
    assert shift[("alphasteer", "benign")] < shift[("actadd", "benign")]  # AlphaSteer spares benign
    assert shift[("alphasteer", "benign")] < shift[("alphasteer", "malicious")]
    assert facts["rows"] > 0


def _check_sweep(facts: dict) -> None:
    assert facts["layers"] == list(range(2, 30, 4))
    assert all(0.0 <= a <= 1.0 for a in facts["auroc"])
    assert max(facts["auroc"]) > 0.8  # some layer separates harmful from harmless prompts
    assert facts["generation_layers"] == facts["layers"][2:5]


def _check_any_model(facts: dict) -> None:
    assert facts["formats"] == ["raw", "chat"]  # base GPT-2 reads raw text, Qwen2 its template
    assert all(0 < k < 32 for k in facts["k"]) and all(0 <= x < 0.5 for x in facts["leakage"])
    assert facts["reloaded"] == [1, 2]
    shift = {(r["method"], r["label"]): r["shift"] for r in facts["shifts"]}
    assert shift[("alphasteer", "benign")] < shift[("actadd", "benign")]


CHECKS = {"01_quickstart": _check_quickstart, "02_pca_figures": _check_pca}
CHECKS["03_layer_sweep"] = _check_sweep
CHECKS["04_any_model"] = _check_any_model
SMOLLM_NOTEBOOKS = [p for p in NOTEBOOKS if p.stem != "04_any_model"]
TINY_NOTEBOOKS = [p for p in NOTEBOOKS if p.stem == "04_any_model"]


@pytest.mark.smollm
@pytest.mark.parametrize("path", SMOLLM_NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path: Path, tmp_path: Path) -> None:
    """Executes every cell in a fresh kernel (working directory: a temporary folder), then
    checks what the notebook computed against facts it is there to show."""
    _run_and_check(path, tmp_path)


@pytest.mark.parametrize("path", TINY_NOTEBOOKS, ids=lambda p: p.stem)
def test_tiny_model_notebook_runs(path: Path, tmp_path: Path) -> None:
    """The any-model notebook builds its own tiny models: it runs in every leg (TL 3.9 too)."""
    _run_and_check(path, tmp_path)


def _run_and_check(path: Path, tmp_path: Path) -> None:
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(PROBES[path.stem]))
    client = NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    errors = [
        o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"
    ]
    assert not errors
    assert nb.cells[-2].outputs, f"{path.name}: the last cell produced no output"
    printed = "".join(o.get("text", "") for o in nb.cells[-1].outputs if o.output_type == "stream")
    CHECKS[path.stem](json.loads(printed.strip().splitlines()[-1]))
