"""Shared helpers of the benchmark scripts: timing with medians, thread settings, machine text."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from threadpoolctl import threadpool_limits


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--repeats", type=int, default=5, help="timed runs per variant (median)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: shared CPU)")
    return p


def setup(threads: int) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    torch.set_num_threads(threads)
    threadpool_limits(threads)  # scipy's BLAS (syrk in the null-space fit) too
    torch.manual_seed(0)


def machine() -> str:
    """One line: CPU model, cores, load, torch version and threads."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"{cpu}, {os.cpu_count()} cores, load {load:.1f}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s)"
    )


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def interleaved(
    variants: dict[str, Callable[[], Any]], repeats: int, *, warmup: bool = True
) -> dict[str, list[float]]:
    """Run every variant once per round, ``repeats`` rounds (after one warm-up round), so that
    load changes on a shared machine hit all variants alike. Returns the times per variant."""
    for fn in variants.values() if warmup else ():
        fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            times[name].append(timed(fn)[0])
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def spread(xs: list[float]) -> str:
    return f"median {median(xs):.3f} s (min {min(xs):.3f}, max {max(xs):.3f}, n={len(xs)})"


class _Stop(Exception):
    """Ends a Hugging Face forward pass once the last needed block's input is kept."""


def _keep(kept: dict[int, torch.Tensor], layer: int, last: int, args: Any, kwargs: Any) -> None:
    kept[layer] = (args[0] if args else kwargs["hidden_states"])[:, -1].clone()
    if layer == last:
        raise _Stop


@torch.no_grad()
def hf_early_stop(hf: Any, batches: Sequence[Any], layers: Sequence[int]) -> list[torch.Tensor]:
    """A plain Hugging Face forward on each encoded batch (tokens, mask, position ids from the
    mask) that keeps the last position's input to the decoder blocks ``layers`` with forward
    pre-hooks and ends after the last of them, as the toolkit's caching does: per batch,
    ``[rows, len(layers), d_model]``."""
    blocks = hf.model.layers
    out = []
    for b in batches:
        kept: dict[int, torch.Tensor] = {}

        handles = [
            blocks[x].register_forward_pre_hook(
                lambda m, a, kw, x=x, kept=kept: _keep(kept, x, max(layers), a, kw),
                with_kwargs=True,
            )
            for x in layers
        ]
        pos = (b.attention_mask.cumsum(-1) - 1).clamp(min=0)
        try:
            hf(input_ids=b.tokens, attention_mask=b.attention_mask, position_ids=pos)
        except _Stop:
            pass
        finally:
            for handle in handles:
                handle.remove()
        out.append(torch.stack([kept[x] for x in layers], 1))
    return out


def write_report(res: dict[str, Any], path: str | Path) -> Path:
    """Write a benchmark's JSON report (creating its folder) and say where."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {out}")
    return out
