"""What every pipeline writes the same way: Markdown tables, per-step timings, peak memory, and the
output directory's guard (an existing run is kept unless ``--force`` or ``--resume``)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from alphasteer_lens.experiments.config import ConfigError

RUN_MARKERS = ("manifest.json", "report.json", "settings.json")


def _cell(v: Any, digits: int) -> str:
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.{digits}f}"
    return str(v)


def markdown_table(df: pd.DataFrame, *, index: bool = True, digits: int = 3) -> str:
    """A GitHub Markdown table of ``df``: the index first (headed by its names) when ``index``,
    floats to ``digits`` decimals, NaN as an empty cell."""
    names = [n if n is not None else "" for n in df.index.names] if index else []
    head = [*map(str, names), *map(str, df.columns)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for idx, row in zip(df.index, df.itertuples(index=False), strict=True):
        keys = (idx if isinstance(idx, tuple) else (idx,)) if index else ()
        cells = [*map(str, keys), *(_cell(v, digits) for v in row)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


@dataclass
class Clock:
    """Wall time per named step (``lap`` closes the step that began at the previous lap)."""

    start: float = field(default_factory=time.perf_counter)
    steps: dict[str, float] = field(default_factory=dict)

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.steps[name] = round(now - self.start - sum(self.steps.values()), 2)

    def total(self) -> float:
        return round(time.perf_counter() - self.start, 1)


def peak_rss_mib() -> float | None:
    """Peak resident memory of this process so far (MiB), or None where the OS does not say."""
    try:
        import resource
    except ImportError:  # not on Windows
        return None
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return round(kib / 1024, 1)


def check_out_dir(out: str | Path, *, force: bool = False, resume: bool = False) -> Path:
    """``out`` as a directory to write a run to. A file there, or an earlier run without
    ``force`` or ``resume``, is a :class:`ConfigError`; nothing is deleted either way."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output path {out} exists and is not a directory")
    held = [m for m in RUN_MARKERS if (out / m).exists()]
    if held and not (force or resume):
        raise ConfigError(
            f"{out} already holds a run ({held[0]}): pass --force to overwrite it or --resume "
            "to continue it"
        )
    if resume and force:
        raise ConfigError("--force and --resume exclude each other")
    return out
