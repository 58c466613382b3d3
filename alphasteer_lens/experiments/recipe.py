"""The recipe every AlphaSteer pipeline builds on: prompt splits → last-token activations →
refusal direction (length-matched difference in means by default) → steered layers (given, or
chosen on validation data) → null space and AlphaSteer fit → λ chosen on validation data.

Data (seeded): benign train/val = the built-in benign set (85/15); harmful train/val =
Do-Not-Answer (optionally ``n_harmful_train`` of it, 85/15) plus 40% / 10% of HarmBench; harmful
test = the other 50% of HarmBench (held out); benign test = MT-Bench turn 1. Do-Not-Answer's short
questions alone do not transfer to HarmBench's imperative requests, hence the HarmBench share.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import pandas as pd
import torch
from torch import Tensor

from alphasteer_lens.activations import Activations, cache_activations, last_token
from alphasteer_lens.alphasteer import AlphaSteer
from alphasteer_lens.directions import diff_in_means, refused_minus_complied
from alphasteer_lens.experiments.config import ConfigError, RunConfig
from alphasteer_lens.experiments.data import Data
from alphasteer_lens.experiments.layers import LayerChoice, candidate_layers, choose_layers
from alphasteer_lens.formats import PromptFormat, default_format
from alphasteer_lens.generation import generate, next_token_logits
from alphasteer_lens.judges import KeywordJudge, RefusalTokens, refusal_score
from alphasteer_lens.models import HookedModel
from alphasteer_lens.prompts import PromptSet
from alphasteer_lens.sources import hub_offline
from alphasteer_lens.steering import ActAdd

# --- before the model loads -----------------------------------------------------------------


def check_model_arg(model: str | None) -> None:
    """A ``--model`` that cannot load is a :class:`ConfigError` before anything loads."""
    if model is None:
        return
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ConfigError(f"--model {path} is a file, not a model directory")
        if not (path / "config.json").is_file():
            raise ConfigError(f"--model {path} has no config.json: not a Hugging Face model")
        return
    if model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise ConfigError(f"--model {model}: no such directory")
    if hub_offline():
        raise ConfigError(
            f"--model {model} is not a local directory and the hub is offline (HF_HUB_OFFLINE=1)"
        )


def check_device(cfg: RunConfig) -> None:
    """``--device`` / ``--device-map`` / ``--max-memory`` that cannot work, as a ConfigError."""
    if cfg.device is not None and cfg.device_map is not None:
        raise ConfigError("pass --device or --device-map, not both")
    if cfg.max_memory is not None and cfg.device_map is None:
        raise ConfigError("--max-memory needs --device-map (e.g. --device-map auto)")
    if cfg.device is None:
        return
    try:
        dev = torch.device(cfg.device)
    except RuntimeError:
        raise ConfigError(f"--device {cfg.device!r} is not a torch device") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {cfg.device}: no CUDA device is available")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"--device {cfg.device}: MPS is not available")


def preflight(cfg: RunConfig) -> Data:
    """Every check that needs no model (model path, device, data directory); the data resolver."""
    check_model_arg(cfg.model)
    check_device(cfg)
    data = Data.from_dir(cfg.data_dir, cfg.hf_datasets)
    data.load_hf()
    return data


def load(cfg: RunConfig) -> tuple[HookedModel, PromptFormat]:
    """The model the config names (None: the embedded SmolLM2) and the prompt format to use."""
    from alphasteer_lens.models import load_model

    max_memory: dict[int | str, int | str] | None = None
    if cfg.max_memory is not None:
        max_memory = {int(k) if k.isdigit() else k: v for k, v in cfg.max_memory.items()}
    try:
        model = load_model(
            cfg.model,
            dtype=getattr(torch, cfg.dtype),
            device=cfg.device,
            device_map=cfg.device_map,
            max_memory=max_memory,
        )
    except OSError as err:  # not on the hub, no access, no network
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"--model {cfg.model}: cannot load it ({first})") from None
    if cfg.prompt_format is not None:
        fmt = PromptFormat.parse(cfg.prompt_format)
        if fmt.kind == "chat" and not getattr(model.tokenizer, "chat_template", None):
            raise ConfigError(
                f"--prompt-format chat: {cfg.model} has no chat template (use raw or a template)"
            )
    else:
        fmt = default_format(model.tokenizer)
    if cfg.layers is not None and max(cfg.layers) >= int(model.cfg.n_layers):
        raise ConfigError(
            f"--layers {list(cfg.layers)}: the model has {model.cfg.n_layers} layers (0-based)"
        )
    return model, fmt


def threads() -> int:
    return int(os.environ.get("OMP_NUM_THREADS") or torch.get_num_threads())


# --- data -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Splits:
    """The seeded prompt splits of a run (see the module docstring)."""

    benign_train: PromptSet
    benign_val: PromptSet
    harmful_train: PromptSet
    harmful_val: PromptSet
    harmful_test: PromptSet
    benign_test: PromptSet

    def sets(self) -> dict[str, PromptSet]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def fits_context(
    model: HookedModel, prompts: Sequence[str], fmt: PromptFormat, room: int
) -> list[bool] | None:
    """Per prompt, whether its tokens leave at least ``room`` positions of the model's context;
    None when the model states no context length."""
    from alphasteer_lens.chat import encode_texts

    n_ctx = getattr(model.cfg, "n_ctx", None)
    if not isinstance(n_ctx, int) or not prompts:
        return None
    _, ids = encode_texts(model, list(prompts), fmt)
    return [len(row) + room <= n_ctx for row in ids]


def within_context(
    model: HookedModel, ps: PromptSet | None, fmt: PromptFormat, room: int
) -> tuple[PromptSet | None, str | None]:
    """``ps`` without the prompts whose tokens leave fewer than ``room`` positions of the model's
    context (long jailbreak templates or pasted passages on small-context models), and a note
    saying so; None when no prompt fits."""
    ok = None if ps is None else fits_context(model, list(ps), fmt, room)
    if ps is None or ok is None or all(ok):
        return ps, None
    kept = [p for p, keep in zip(ps, ok, strict=True) if keep]
    return (ps._derive(kept) if kept else None), too_long_note(ps.name, ok, model)


def too_long_note(name: str, ok: list[bool], model: HookedModel) -> str:
    """The report note for the prompts of set ``name`` that :func:`fits_context` left out."""
    return f"{name}: {ok.count(False)} prompts longer than the context ({model.cfg.n_ctx}) left out"


def splits(
    data: Data,
    cfg: RunConfig,
    *,
    n_harmful_test: int | None = None,
    n_benign_test: int | None = None,
    model: HookedModel | None = None,
    fmt: PromptFormat | None = None,
) -> Splits:
    """The standard splits; validation sets capped at ``cfg.n_val``, test sets optionally
    sampled. Given the model and prompt format, prompts that leave fewer than
    ``cfg.max_new_tokens`` positions of its context are left out of every split (a note in
    ``data.notes`` each); a split left empty is a :class:`ConfigError`."""
    seed, n_val, parts = cfg.seed, cfg.n_val, (1 - cfg.val_fraction, cfg.val_fraction)
    benign_train, benign_val = data.prompts("builtin_benign").split(parts, seed=seed)
    dna = data.prompts("do_not_answer").deduplicated()
    if cfg.n_harmful_train is not None:
        dna = dna.sample(min(cfg.n_harmful_train, len(dna)), seed=seed)
    dna_train, dna_val = dna.split(parts, seed=seed)
    hb_train, hb_val, harmful_test = data.prompts("harmbench").split((0.4, 0.1, 0.5), seed=seed)
    harmful_train = PromptSet.concat("harmful_train", dna_train, hb_train)
    harmful_val = PromptSet.concat("harmful_val", dna_val, hb_val)
    benign_test = data.prompts("mt_bench")

    def cap(ps: PromptSet, n: int | None) -> PromptSet:
        return ps if n is None or n >= len(ps) else ps.sample(n, seed=seed)

    sp = Splits(
        benign_train=benign_train,
        benign_val=cap(benign_val, n_val),
        harmful_train=harmful_train,
        harmful_val=cap(harmful_val, n_val),
        harmful_test=cap(harmful_test, n_harmful_test),
        benign_test=cap(benign_test, n_benign_test),
    )
    if model is None or fmt is None:
        return sp
    kept: dict[str, PromptSet] = {}
    for name, ps in sp.sets().items():
        fitted, note = within_context(model, ps, fmt, cfg.max_new_tokens)
        if fitted is None:
            raise ConfigError(f"no {name} prompt fits the model's context ({model.cfg.n_ctx})")
        kept[name] = fitted
        data.notes.extend([note] if note else [])
    return Splits(**kept)


# --- the fit --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fit:
    """What the recipe fitted: layers (and how chosen), activations at every cached layer,
    refusal directions, AlphaSteer, ActAdd of the same directions at the same layers;
    ``fit_benign``/``fit_malicious``: AlphaSteer's two fit sides ``{layer: [n, d]}`` (the plain
    sets plus ``extra_benign``/``extra_malicious``; ``[n, 2, d]`` with the prompt means when
    :func:`fit` cached ``positions="last+mean"``)."""

    choice: LayerChoice
    benign: Activations
    harmful: Activations
    direction_benign: Activations
    refusal: dict[int, Tensor]
    alphasteer: AlphaSteer
    actadd: ActAdd
    refused_fraction: float | None = None
    fit_benign: dict[int, Tensor] = field(default_factory=dict)
    fit_malicious: dict[int, Tensor] = field(default_factory=dict)

    @property
    def layers(self) -> list[int]:
        return list(self.choice.layers)


def select_layers(
    model: HookedModel, sp: Splits, cfg: RunConfig, fmt: PromptFormat, *, progress: bool = True
) -> LayerChoice:
    """Layers chosen on validation data (:func:`~.layers.choose_layers`), with directions from
    ``n_select_fit`` harmful training prompts and as many length-matched benign ones, cached at
    the candidate layers only: the full fit then caches just the chosen layers."""
    stride = candidate_layers(
        int(model.cfg.n_layers), skip_last=cfg.skip_last, stride=cfg.select_stride
    )
    harmful = sp.harmful_train.sample(min(cfg.n_select_fit, len(sp.harmful_train)), seed=cfg.seed)
    benign = (
        sp.benign_train.length_matched(harmful)
        if cfg.length_matched
        else sp.benign_train.sample(min(cfg.n_select_fit, len(sp.benign_train)), seed=cfg.seed)
    )
    kw: dict[str, Any] = {
        "layers": stride, "batch_size": cfg.batch_size, "prompt_format": fmt,
        "progress": progress,
    }  # fmt: skip
    acts_h = cache_activations(model, list(harmful), desc="selection: harmful", **kw)
    acts_b = cache_activations(model, list(benign), desc="selection: benign", **kw)
    n = cfg.n_select
    return choose_layers(
        model,
        {layer: diff_in_means(acts_h[layer], acts_b[layer]) for layer in stride},
        list(sp.harmful_val[: min(n, len(sp.harmful_val))]),
        list(sp.benign_val[: min(n, len(sp.benign_val))]),
        width=cfg.n_steer_layers,
        skip_last=cfg.skip_last,
        strength=cfg.select_strength,
        one_se=cfg.select_one_se,
        batch_size=cfg.batch_size,
        prompt_format=fmt,
        progress=progress,
    )


def fit(
    model: HookedModel,
    sp: Splits,
    cfg: RunConfig,
    fmt: PromptFormat,
    *,
    extra_layers: tuple[int, ...] = (),
    extra_benign: PromptSet | None = None,
    extra_malicious: PromptSet | None = None,
    cache: bool | Path = False,
    positions: Literal["last", "last+mean"] = "last",
    progress: bool = True,
) -> Fit:
    """Choose the layers if none are given (:func:`select_layers`), cache activations at the
    steered layers (and ``extra_layers``), build the refusal directions, fit AlphaSteer.

    ``extra_benign`` (e.g. sensitive-but-safe prompts) joins the benign side of the AlphaSteer
    fit (its null space) and ``extra_malicious`` (e.g. jailbreak-wrapped requests) its
    malicious side; neither enters the refusal direction, which stays plain harmful vs
    (length-matched) benign. ``positions="last+mean"`` caches each prompt's mean with its last
    token in the same pass: the fit reads the last token, and ``Fit.fit_benign`` /
    ``fit_malicious`` keep both (``[n, 2, d]``) for a gate probe that reads the mean."""
    if positions not in ("last", "last+mean"):
        raise ValueError(f"fit: positions must be 'last' or 'last+mean', got {positions!r}")
    if cfg.layers is not None:
        choice = LayerChoice(tuple(cfg.layers), "given")
    else:
        choice = select_layers(model, sp, cfg, fmt, progress=progress)
    layers = list(choice.layers)
    need = sorted(set(layers) | set(extra_layers))
    kw: dict[str, Any] = {
        "layers": need, "batch_size": cfg.batch_size, "prompt_format": fmt, "cache": cache,
        "positions": positions, "progress": progress,
    }  # fmt: skip
    wide_b = cache_activations(model, list(sp.benign_train), desc="benign activations", **kw)
    wide_h = cache_activations(model, list(sp.harmful_train), desc="harmful activations", **kw)
    acts_b, acts_h = wide_b.last_token(), wide_h.last_token()
    dir_b = (
        acts_b.select(sp.benign_train.length_matched_indices(sp.harmful_train))
        if cfg.length_matched
        else acts_b
    )
    refusal = {layer: diff_in_means(acts_h[layer], dir_b[layer]) for layer in need}
    refused_fraction = None
    if cfg.direction == "refused_minus_complied":
        answers = generate(
            model, list(sp.harmful_train), max_new_tokens=cfg.label_tokens,
            batch_size=cfg.batch_size, prompt_format=fmt, progress=progress,
            desc="labelling harmful answers",
        )  # fmt: skip
        refused = KeywordJudge().judge(answers)
        refused_fraction = sum(refused) / len(refused)
        refusal = {
            **refusal,
            **{layer: refused_minus_complied(acts_h[layer], refused) for layer in layers},
        }
    fit_b, fit_h = wide_b.by_layer(), wide_h.by_layer()
    for extra, side, what in (
        (extra_benign, fit_b, "benign"),
        (extra_malicious, fit_h, "malicious"),
    ):
        if extra is not None and len(extra):
            more = cache_activations(model, list(extra), desc=f"extra {what} activations", **kw)
            for layer in need:
                side[layer] = torch.cat([side[layer], more[layer].to(side[layer].dtype)])
    alphasteer = AlphaSteer.fit(
        {x: last_token(t) for x, t in fit_b.items()},
        {x: last_token(t) for x, t in fit_h.items()},
        refusal, layers=layers, ratio=cfg.ratio, alpha=cfg.alpha,
    )  # fmt: skip
    actadd = ActAdd(tuple(layers), torch.stack([refusal[layer] for layer in layers]))
    return Fit(
        choice, acts_b, acts_h, dir_b, refusal, alphasteer, actadd, refused_fraction, fit_b, fit_h
    )


# --- λ on validation data -------------------------------------------------------------------


def validation_sweep(
    model: HookedModel,
    harmful: list[str],
    benign: list[str],
    steerings: Mapping[str, Any],
    strengths: tuple[float, ...] | Mapping[str, tuple[float, ...]],
    *,
    fmt: PromptFormat,
    batch_size: int,
    harmful_only: tuple[str, ...] = (),
    progress: bool = True,
) -> pd.DataFrame:
    """First-token refusal score and rate (log-odds > 0) on validation sets, per (method, λ),
    with the vanilla model as ``("vanilla", 0.0)``. ``strengths``: one λ grid for every method,
    or a grid per method name. Methods in ``harmful_only`` are scored on the harmful set only
    (their benign columns are None): ActAdd's λ is matched on harmful refusal alone, so its
    benign passes would cost time and decide nothing."""
    ids = RefusalTokens.from_tokenizer(model.tokenizer).ids
    kw: dict[str, Any] = {"batch_size": batch_size, "prompt_format": fmt, "progress": progress}
    grid = strengths if isinstance(strengths, Mapping) else dict.fromkeys(steerings, strengths)
    runs: list[tuple[str, Any, float]] = [("vanilla", None, 0.0)]
    runs += [(name, st, lam) for name, st in steerings.items() for lam in grid[name]]
    rows = []
    for name, st, lam in runs:
        row: dict[str, Any] = {"method": name, "strength": lam}
        for side, ps in (("harmful", harmful), ("benign", benign)):
            if side == "benign" and name in harmful_only:
                row |= {"benign_score": None, "benign_refusal": None}
                continue
            logits = next_token_logits(
                model, ps, steering=st, strength=lam, desc=f"val {name} {lam}", **kw
            )
            score = refusal_score(logits, ids)
            row[f"{side}_score"] = score.mean().item()
            row[f"{side}_refusal"] = (score > 0).float().mean().item()
        rows.append(row)
    return pd.DataFrame(rows)


def choose_strength(sweep: pd.DataFrame, max_benign_rise: float, method: str) -> float:
    """``method``'s λ: the highest harmful first-token refusal on validation data among the
    strengths whose benign first-token refusal rises by at most ``max_benign_rise`` over
    vanilla (ties go to the smaller λ; the smallest λ when none qualifies)."""
    base = sweep[sweep.method == "vanilla"].iloc[0]
    a = sweep[sweep.method == method].sort_values("strength")
    if a.empty:
        raise ValueError(f"the validation sweep has no rows for {method!r}")
    ok = a[a.benign_refusal <= base.benign_refusal + max_benign_rise + 1e-9]
    pool = ok if len(ok) else a.head(1)
    return float(pool.loc[pool.harmful_refusal.idxmax()].strength)


def choose_strengths(sweep: pd.DataFrame, max_benign_rise: float) -> tuple[float, float]:
    """AlphaSteer's λ (:func:`choose_strength`) and ActAdd's: the one whose harmful refusal
    comes closest to AlphaSteer's at its λ."""
    lam = choose_strength(sweep, max_benign_rise, "alphasteer")
    a = sweep[sweep.method == "alphasteer"]
    target = float(a[a.strength == lam].harmful_refusal.iloc[0])
    b = sweep[sweep.method == "actadd"].sort_values("strength")
    act = b.iloc[int((b.harmful_refusal - target).abs().to_numpy().argmin())]
    return lam, float(act.strength)


def library_format(fmt: PromptFormat, model: HookedModel) -> None:
    """Parts of the library that take no ``prompt_format`` yet (sweeps, PCA, SCANS, the audit)
    read prompts in the model's default format: any other format is a :class:`ConfigError`."""
    if fmt != default_format(model.tokenizer):
        raise ConfigError(
            f"--prompt-format {fmt.kind}: this pipeline supports only the model's default "
            f"format ({default_format(model.tokenizer).kind}) for now"
        )
