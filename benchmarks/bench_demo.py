"""Benchmark 5: the demo's wall time end to end, and where it goes.

The demo is timed by itself: ``alphasteer-lens demo`` writes ``runs/demo/report.json`` with the
total (``seconds``), per-step ``timings`` and peak memory. This script prints them as a profile;
pass ``--run`` to run the demo first (minutes on a 2-core CPU; ``--force`` is implied), with
``--quick`` for the smoke settings and ``--layers 14-18`` to skip the automatic layer choice.

    python benchmarks/bench_demo.py [--report runs/demo/report.json] [--run] [--quick]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--report", type=Path, default=Path("runs/demo/report.json"))
    p.add_argument("--run", action="store_true", help="run the demo first")
    p.add_argument("--quick", action="store_true", help="with --run: the quick demo")
    p.add_argument("--layers", default=None, help="with --run: fixed layers, e.g. 14-18")
    args = p.parse_args()
    if args.run:
        from alphasteer_lens.experiments.cli import main as cli

        argv = ["demo", "--out", str(args.report.parent), "--force"]
        argv += ["--quick"] if args.quick else []
        argv += ["--layers", args.layers] if args.layers else []
        if cli(argv) != 0:
            raise SystemExit("the demo failed")
    if not args.report.exists():
        raise SystemExit(f"{args.report} not found: run `alphasteer-lens demo` or pass --run")
    report = json.loads(args.report.read_text())
    total = float(report["seconds"])
    print(f"demo wall time: {total:.0f} s ({report.get('data', {})})")
    print(f"peak resident memory: {report.get('peak_rss_mib')} MiB")
    for step, secs in sorted(report["timings"].items(), key=lambda kv: -kv[1]):
        print(f"  {step:20s} {secs:8.1f} s  {100 * secs / total:5.1f}%")


if __name__ == "__main__":
    main()
