"""The README's code block runs verbatim on the embedded model."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _snippet() -> str:
    text = README.read_text(encoding="utf-8")
    section = text.split("## Five lines to a steered generation", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match is not None, "the README lost its five-line snippet"
    return match.group(1)


@pytest.mark.smollm
def test_readme_snippet_runs_verbatim() -> None:
    out = io.StringIO()
    scope: dict[str, object] = {}
    with contextlib.redirect_stdout(out):
        exec(compile(_snippet(), str(README), "exec"), scope)  # noqa: S102 - our own README
    printed = out.getvalue().strip()
    assert printed.startswith("[") and printed.count("'") >= 4, printed
    steering = scope["steering"]
    harmful, benign = scope["harmful"], scope["benign"]
    layer = 18
    h_scores = steering.malicious_scores(layer, harmful[layer])  # type: ignore[attr-defined]
    b_scores = steering.malicious_scores(layer, benign[layer])  # type: ignore[attr-defined]
    assert float(h_scores.mean()) > 0.5 > abs(float(b_scores.mean()))
