"""One config base for every pipeline: the settings they share, read from defaults, a quick
preset, a TOML file and command-line flags (in that order, later ones win).

Each pipeline subclasses :class:`RunConfig` and adds only its own fields; a field is defined in
one class only. ``QUICK`` (a class attribute) holds the pipeline's smoke-run overrides, applied
when ``quick`` is on, under anything the user sets.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar, TypeVar

DTYPES = ("float32", "float16", "bfloat16", "float64")
DIRECTIONS = ("diff_in_means", "refused_minus_complied")
C = TypeVar("C", bound="RunConfig")


class ConfigError(ValueError):
    """An expected user error (bad value, missing file, existing run): the CLI prints its one
    line and exits with status 2, before any model loads."""


@dataclass(frozen=True)
class RunConfig:
    """Settings shared by every pipeline.

    ``model``: a Hugging Face id or local directory (None: the embedded SmolLM2).
    ``layers``: steered layers; None chooses them on validation data
    (:mod:`alphasteer_lens.experiments.layers`). ``n_steer_layers`` (None: about a sixth of
    the model's layers), ``skip_last``, ``select_strength``, ``n_select`` (validation prompts
    per side), ``n_select_fit`` (training prompts per side for the candidate directions) and
    ``select_stride`` (None: about 12 candidates) and ``select_one_se`` (the earliest window
    within one standard error of the best, else the best) set that choice. ``prompt_format``:
    ``chat``, ``raw`` or a template holding ``{prompt}`` (None: chat when the tokenizer has a
    template, else raw).
    ``data_dir``: where named prompt sets are looked up first (else ``$ALPHASTEER_LENS_DATA``).
    ``hf_datasets``: named prompt sets to take from Hugging Face datasets when ``data_dir`` has
    none, as ``{name: "ID[@CONFIG][:SPLIT[:COLUMN]]"}`` (see :func:`parse_hf_dataset`).
    ``direction``: ``diff_in_means`` (harmful − benign means, the benign side length-matched to
    the harmful prompts unless ``length_matched`` is off) or ``refused_minus_complied`` (among
    the harmful prompts, labelled by the model's own greedy answers of ``label_tokens``).
    """

    seed: int = 0
    model: str | None = None
    device: str | None = None
    dtype: str = "float32"
    device_map: str | None = None
    max_memory: dict[str, str] | None = None
    prompt_format: str | None = None
    data_dir: str | None = None
    hf_datasets: dict[str, str] | None = None
    out: str | None = None
    quick: bool = False
    layers: tuple[int, ...] | None = None
    n_steer_layers: int | None = None
    skip_last: float = 0.2
    select_strength: float = 1.0
    n_select: int = 32
    n_select_fit: int = 128
    select_stride: int | None = None
    select_one_se: bool = True
    ratio: float = 0.5
    alpha: float = 10.0
    direction: str = "diff_in_means"
    length_matched: bool = True
    label_tokens: int = 16
    val_fraction: float = 0.15
    n_val: int = 80
    batch_size: int = 32
    max_new_tokens: int = 24
    strengths: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0, 1.5)
    max_benign_rise: float = 0.03
    n_harmful_train: int | None = None

    QUICK: ClassVar[Mapping[str, Any]] = {}

    def __post_init__(self) -> None:
        for f in fields(self):
            object.__setattr__(self, f.name, _coerce(type(self), f.name, getattr(self, f.name)))
        checks = [
            ("batch_size", self.batch_size >= 1, ">= 1"),
            ("max_new_tokens", self.max_new_tokens >= 1, ">= 1"),
            ("ratio", 0.0 < self.ratio < 1.0, "in (0, 1)"),
            ("alpha", self.alpha >= 0.0, ">= 0"),
            ("skip_last", 0.0 <= self.skip_last < 1.0, "in [0, 1)"),
            ("n_select", self.n_select >= 2, ">= 2"),
            ("n_select_fit", self.n_select_fit >= 2, ">= 2"),
            ("dtype", self.dtype in DTYPES, f"one of {list(DTYPES)}"),
            ("strengths", bool(self.strengths) and min(self.strengths) >= 0, "non-empty, >= 0"),
            ("layers", self.layers is None or (bool(self.layers) and min(self.layers) >= 0),
             "non-empty, >= 0"),
            ("n_steer_layers", (self.n_steer_layers or 1) >= 1, ">= 1"),
            ("select_stride", (self.select_stride or 1) >= 1, ">= 1"),
            ("n_harmful_train", (self.n_harmful_train or 1) >= 1, ">= 1"),
            ("direction", self.direction in DIRECTIONS, f"one of {list(DIRECTIONS)}"),
            ("val_fraction", 0.0 < self.val_fraction < 1.0, "in (0, 1)"),
            ("n_val", self.n_val >= 1, ">= 1"),
        ]  # fmt: skip
        for name, ok, rule in checks:
            if not ok:
                raise ConfigError(f"{name} must be {rule}, got {getattr(self, name)!r}")
        for spec in (self.hf_datasets or {}).values():
            parse_hf_dataset(spec)
        if self.prompt_format is not None:
            from alphasteer_lens.formats import PromptFormat

            try:
                PromptFormat.parse(self.prompt_format)
            except ValueError as err:
                raise ConfigError(str(err)) from None

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe settings (tuples become lists)."""
        return {f.name: _jsonable(getattr(self, f.name)) for f in fields(self)}

    def replace(self: C, **changes: Any) -> C:
        return dataclasses.replace(self, **changes)


def _jsonable(v: Any) -> Any:
    if isinstance(v, tuple):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    return v


def _type_of(cls: type, name: str) -> Any:
    return typing.get_type_hints(cls)[name]


def _coerce(cls: type, name: str, value: Any) -> Any:
    """``value`` as field ``name`` of ``cls`` wants it: lists to tuples, ints to floats; anything
    else of the wrong type is a :class:`ConfigError` naming the field."""
    hint = _type_of(cls, name)
    union = isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union  # noqa: TID251
    options = typing.get_args(hint) if union else (hint,)
    if value is None:
        if type(None) in options:
            return None
        raise ConfigError(f"config field {name!r} cannot be empty")
    for opt in options:
        origin = typing.get_origin(opt) or opt
        if origin is typing.Literal:
            if value in typing.get_args(opt):
                return value
            continue
        if origin is tuple and isinstance(value, (list, tuple)):
            (item,) = {a for a in typing.get_args(opt) if a is not Ellipsis}
            return tuple(_scalar(item, name, v) for v in value)
        if origin is dict and isinstance(value, Mapping):
            bad = {k: v for k, v in value.items() if not isinstance(v, str)}
            if bad:
                raise ConfigError(f"config field {name!r} holds strings only, got {bad!r}")
            return {str(k): v for k, v in value.items()}
        if origin in (int, float, str, bool):
            try:
                return _scalar(origin, name, value)
            except ConfigError:
                continue
    want = " or ".join(
        " or ".join(map(repr, typing.get_args(o)))
        if typing.get_origin(o) is typing.Literal
        else getattr(o, "__name__", str(o))
        for o in options
    )
    raise ConfigError(f"config field {name!r} must be {want}, got {value!r}")


def _scalar(kind: type, name: str, value: Any) -> Any:
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif isinstance(value, kind):
        return value
    raise ConfigError(f"config field {name!r} must be {kind.__name__}, got {value!r}")


def read_toml(path: str | Path) -> dict[str, Any]:
    """The settings in a TOML file (top-level keys, or a ``[run]`` table)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        import tomllib
    except ImportError:  # Python 3.10
        raise ConfigError("--config needs Python 3.11 (tomllib)") from None
    try:
        data = tomllib.loads(path.read_text("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"malformed TOML in {path}: {err}") from None
    run = data.get("run")
    return dict(run) if isinstance(run, dict) else data


def build_config(
    cls: type[C],
    *,
    toml: str | Path | None = None,
    settings: Mapping[str, Any] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> C:
    """``cls`` from its defaults, its ``QUICK`` preset (when ``quick`` is set anywhere), the TOML
    file, ``settings`` (e.g. a manifest's config) and ``overrides`` (command-line flags; None
    values are "not given"), later ones winning. Unknown keys are a :class:`ConfigError`."""
    values: dict[str, Any] = {}
    for source, where in (
        (read_toml(toml) if toml is not None else {}, str(toml)),
        (dict(settings or {}), "settings"),
        ({k: v for k, v in (overrides or {}).items() if v is not None}, "flags"),
    ):
        unknown = sorted(set(source) - set(cls.field_names()))
        if unknown:
            raise ConfigError(
                f"unknown setting(s) {unknown} in {where}; known: {', '.join(cls.field_names())}"
            )
        values.update(source)
    quick = values.get("quick", False)
    merged = {**(dict(cls.QUICK) if quick is True else {}), **values}
    return cls(**merged)


def parse_max_memory(spec: str | None) -> dict[str, str] | None:
    """``"0=20GiB,cpu=64GiB"`` → ``{"0": "20GiB", "cpu": "64GiB"}`` (accelerate's max_memory)."""
    if spec is None:
        return None
    out: dict[str, str] = {}
    for part in spec.split(","):
        key, sep, value = part.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise ConfigError(f"--max-memory must look like '0=20GiB,cpu=64GiB', got {spec!r}")
        out[key.strip()] = value.strip()
    return out


@dataclass(frozen=True)
class HfDataset:
    """Where a named prompt set lives on the Hugging Face hub."""

    id: str
    config: str | None = None
    split: str = "train"
    column: str | None = None


_HF_ID = re.compile(r"[^\s:@]+")  # a hub id (org/name) or a local folder


def parse_hf_dataset(spec: str) -> HfDataset:
    """``"ID[@CONFIG][:SPLIT[:COLUMN]]"``, e.g. ``"walledai/HarmBench@standard:train:prompt"``
    (split ``train`` and the default prompt columns when left out)."""
    head, *rest = spec.strip().split(":")
    ident, _, config = head.partition("@")
    ok = bool(_HF_ID.fullmatch(ident)) and len(rest) <= 2 and all(p.strip() for p in rest)
    if not ok or (config == "" and "@" in head):
        raise ConfigError(
            f"Hugging Face dataset must look like 'ID[@CONFIG][:SPLIT[:COLUMN]]' "
            f"(e.g. 'walledai/HarmBench@standard:train:prompt'), got {spec!r}"
        )
    split = rest[0].strip() if rest else "train"
    column = rest[1].strip() if len(rest) > 1 else None
    return HfDataset(ident, config or None, split, column)


def parse_hf_datasets(specs: Sequence[str] | None) -> dict[str, str] | None:
    """``["harmbench=walledai/HarmBench:train", ...]`` (repeated ``--hf-dataset``) → a dict."""
    if not specs:
        return None
    out: dict[str, str] = {}
    for item in specs:
        name, sep, spec = item.partition("=")
        if not sep or not name.strip():
            raise ConfigError(
                f"--hf-dataset must look like 'NAME=ID[:SPLIT[:COLUMN]]', got {item!r}"
            )
        parse_hf_dataset(spec)
        out[name.strip()] = spec.strip()
    return out


def parse_layers(spec: str | None) -> tuple[int, ...] | None:
    """``"14-18"``, ``"3,5,7"`` or ``"auto"`` (None) from the command line."""
    if spec is None or spec.strip().lower() == "auto":
        return None
    layers: list[int] = []
    try:
        for part in spec.split(","):
            lo, sep, hi = part.strip().partition("-")
            layers += list(range(int(lo), int(hi) + 1)) if sep else [int(lo)]
    except ValueError:
        raise ConfigError(
            f"--layers must look like '14-18', '3,5,7' or 'auto', got {spec!r}"
        ) from None
    return tuple(layers)


def parse_floats(spec: str | None, flag: str) -> tuple[float, ...] | None:
    if spec is None:
        return None
    try:
        return tuple(float(x) for x in spec.split(","))
    except ValueError:
        raise ConfigError(f"{flag} must be numbers separated by commas, got {spec!r}") from None
